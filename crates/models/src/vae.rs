//! The VAE (`AutoencoderKL`): images to latent distributions and latents back to images.
//!
//! Frozen in atomtune (latents are computed once per training image), so it is built from the
//! same differentiable blocks as the UNet but needs no adapters. Older checkpoints name the mid
//! attention `query`/`key`/`value`/`proj_attn` (sometimes as 1x1 conv weights); both namings load.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::config::VaeConfig;
use crate::layers::Layers;
use crate::nn::{Conv2d, Conv2dSpec, GroupNorm};
use crate::resnet::{ResnetBlock, ResnetOpts};
use crate::weights::Weights;
use crate::Result;

const EPS: f64 = 1e-6;

/// A linear map loaded from `[out, in]` or `[out, in, 1, 1]` under the first name that exists.
#[derive(Debug, Clone)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(w: &Weights, names: &[&str], c: usize) -> Result<Self> {
        let name = names
            .iter()
            .find(|n| w.contains(&format!("{n}.weight")))
            .unwrap_or(&names[0]);
        let w = w.pp(name);
        let weight = match w.get((c, c), "weight") {
            Ok(t) => t,
            Err(crate::Error::KeyShape { .. }) => w.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
            Err(e) => return Err(e),
        };
        Ok(Dense {
            weight,
            bias: w.get(c, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?)
    }
}

/// The single-head self-attention of the VAE's mid block, with its own group norm and residual.
#[derive(Debug, Clone)]
struct SpatialAttention {
    norm: GroupNorm,
    q: Dense,
    k: Dense,
    v: Dense,
    out: Dense,
}

impl SpatialAttention {
    fn new(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        Ok(SpatialAttention {
            norm: GroupNorm::new(&w.pp("group_norm"), groups, c, EPS)?,
            q: Dense::new(w, &["to_q", "query"], c)?,
            k: Dense::new(w, &["to_k", "key"], c)?,
            v: Dense::new(w, &["to_v", "value"], c)?,
            out: Dense::new(w, &["to_out.0", "proj_attn"], c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let seq = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let (q, k, v) = (
            self.q.forward(&seq)?,
            self.k.forward(&seq)?,
            self.v.forward(&seq)?,
        );
        let o = crate::nn::attention(&q, &k, &v, 1, 1.0 / (c as f64).sqrt())?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<SpatialAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(w: &Weights, layers: &Layers, c: usize, groups: usize, attention: bool) -> Result<Self> {
        let o = resnet(c, c, groups);
        Ok(MidBlock {
            first: ResnetBlock::new(&w.pp("resnets.0"), layers, o)?,
            attention: if attention {
                Some(SpatialAttention::new(&w.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            second: ResnetBlock::new(&w.pp("resnets.1"), layers, o)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.second.forward(&h, None)
    }
}

fn resnet(cin: usize, cout: usize, groups: usize) -> ResnetOpts {
    ResnetOpts {
        cin,
        cout,
        temb: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
        selective_checkpoint: false,
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// A diagonal Gaussian over latents.
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// Mean, `[b, latent, h/f, w/f]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// `mean + exp(logvar / 2) * noise`, with caller-drawn standard normal `noise` (atomtune draws
    /// every random number from its own seeded generator).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)?)
    }
}

/// The autoencoder.
#[derive(Debug, Clone)]
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    /// Where the weights came from (files mapped again when read), to build the f32 copy from.
    weights: Weights,
    /// The f32 copy a half-precision VAE falls back to when it gives NaN, built on first need.
    upcast: OnceLock<Box<Vae>>,
}

/// Whether `dtype` is a half-precision one, whose range the SD VAEs can overflow.
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

impl Vae {
    /// Builds the VAE of `config` from `w` (keys as in diffusers' `vae/`), in `w`'s dtype, or in
    /// f32 when that is half precision and the config says `force_upcast`.
    pub fn new(w: &Weights, config: &VaeConfig) -> Result<Self> {
        if is_half(w.dtype()) && config.force_upcast {
            return Self::build(&w.with_dtype(DType::F32), config);
        }
        Self::build(w, config)
    }

    fn build(w: &Weights, config: &VaeConfig) -> Result<Self> {
        let c = config;
        let layers = Layers::new("vae");
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let lat = c.latent_channels;

        let e = w.pp("encoder");
        let mut blocks = Vec::new();
        for i in 0..n {
            let b = e.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        &b.pp("resnets").pp(j),
                        &layers,
                        resnet(if j == 0 { cin } else { ch[i] }, ch[i], g),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("downsamplers.0.conv"),
                    &layers,
                    Conv2dSpec::new(ch[i], ch[i], 3).stride(2).padding(0),
                )?)
            } else {
                None
            };
            blocks.push((resnets, down));
        }
        let encoder = Encoder {
            conv_in: Conv2d::new(
                &e.pp("conv_in"),
                &layers,
                Conv2dSpec::new(c.in_channels, ch[0], 3),
            )?,
            blocks,
            mid: MidBlock::new(
                &e.pp("mid_block"),
                &layers,
                ch[n - 1],
                g,
                c.mid_block_add_attention,
            )?,
            norm_out: GroupNorm::new(&e.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            conv_out: Conv2d::new(
                &e.pp("conv_out"),
                &layers,
                Conv2dSpec::new(ch[n - 1], 2 * lat, 3),
            )?,
        };

        let d = w.pp("decoder");
        let mut blocks = Vec::new();
        let mut prev = ch[n - 1];
        for i in 0..n {
            let out = ch[n - 1 - i];
            let b = d.pp("up_blocks").pp(i);
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::new(
                        &b.pp("resnets").pp(j),
                        &layers,
                        resnet(if j == 0 { prev } else { out }, out, g),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("upsamplers.0.conv"),
                    &layers,
                    Conv2dSpec::new(out, out, 3),
                )?)
            } else {
                None
            };
            blocks.push((resnets, up));
            prev = out;
        }
        let decoder = Decoder {
            conv_in: Conv2d::new(
                &d.pp("conv_in"),
                &layers,
                Conv2dSpec::new(lat, ch[n - 1], 3),
            )?,
            mid: MidBlock::new(
                &d.pp("mid_block"),
                &layers,
                ch[n - 1],
                g,
                c.mid_block_add_attention,
            )?,
            blocks,
            norm_out: GroupNorm::new(&d.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: Conv2d::new(
                &d.pp("conv_out"),
                &layers,
                Conv2dSpec::new(ch[0], c.out_channels, 3),
            )?,
        };
        Ok(Vae {
            weights: w.reopening(),
            upcast: OnceLock::new(),
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::new(
                    &w.pp("quant_conv"),
                    &layers,
                    Conv2dSpec::new(2 * lat, 2 * lat, 1),
                )?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(Conv2d::new(
                    &w.pp("post_quant_conv"),
                    &layers,
                    Conv2dSpec::new(lat, lat, 1),
                )?)
            } else {
                None
            },
            config: c.clone(),
            encoder,
            decoder,
        })
    }

    /// Its config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The factor between image and latent sides (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Latents are multiplied by this before the UNet (and divided before decoding).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// The dtype it computes in.
    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }

    /// This VAE in f32, built once from the same weights: where a half-precision VAE gave NaN.
    fn upcast(&self) -> Result<&Vae> {
        if let Some(v) = self.upcast.get() {
            return Ok(v);
        }
        let v = Vae::build(&self.weights.with_dtype(DType::F32), &self.config)?;
        Ok(self.upcast.get_or_init(|| Box::new(v)))
    }

    /// Whether a half-precision VAE's result `t` is not finite, so that the f32 copy must redo
    /// the work (the SD VAEs overflow f16 on some inputs).
    fn needs_upcast(&self, t: &Tensor) -> Result<bool> {
        if !is_half(self.dtype()) {
            return Ok(false);
        }
        let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(!sum.is_finite())
    }

    /// Images in [-1, 1], `[b, 3, h, w]` -> the latent distribution `[b, latent, h/f, w/f]`, in
    /// the VAE's dtype ([`Vae::dtype`]; f32 where a half-precision one gave NaN).
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        let d = self.encode_here(&x.to_dtype(self.dtype())?)?;
        if self.needs_upcast(&d.mean)? {
            return self.upcast()?.encode(x);
        }
        Ok(d)
    }

    fn encode_here(&self, x: &Tensor) -> Result<LatentDist> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x)?;
        for (resnets, down) in &e.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = down {
                // diffusers' Downsample2D with padding 0 pads right and bottom by one.
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let lat = self.config.latent_channels;
        let mean = h.narrow(1, 0, lat)?;
        let logvar = h.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// Latents (unscaled: divide by [`Vae::scaling_factor`] first) -> images, about [-1, 1], in
    /// the VAE's dtype (f32 where a half-precision one gave NaN).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let img = self.decode_here(&z.to_dtype(self.dtype())?)?;
        if self.needs_upcast(&img)? {
            return self.upcast()?.decode(z);
        }
        Ok(img)
    }

    fn decode_here(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let mut h = d.mid.forward(&d.conv_in.forward(&z)?)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = up {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        d.conv_out.forward(&d.norm_out.forward_silu(&h)?)
    }
}
