//! `UNet2DConditionModel` for SD 1.x, 2.x and XL, differentiable end to end, every conv and linear
//! registered in a [`Layers`] table by its diffusers name so adapters attach without touching
//! this code.

mod blocks;
mod text_kv;
mod transformer;

use candle_core::{DType, Tensor};

pub use transformer::{Attention, Transformer2D, TransformerOpts};

use crate::config::{DownBlock as DownType, TextTimeConfig, UnetConfig, UpBlock as UpType};
use crate::layers::Layers;
use crate::nn::{Conv2d, Conv2dSpec, GroupNorm, Linear};
use crate::weights::Weights;
use crate::{Error, Result};
use blocks::{AttnSpec, BlockOpts, DownBlock, MidBlock, UpBlock, UpChannels};

/// SDXL's added conditioning of a batch (diffusers' `added_cond_kwargs`).
#[derive(Debug, Clone)]
pub struct TextTime {
    /// The pooled, projected embedding of the second text encoder, `[b, pooled_dim]`.
    pub text_embeds: Tensor,
    /// Original height and width, crop top and left, target height and width: `[b, 6]`.
    pub time_ids: Tensor,
}

impl TextTime {
    /// The time ids of images of `original` size (height, width), cropped at `crop` (top, left)
    /// to `target` size: `[1, 6]`, f32 on `device`.
    pub fn time_ids(
        original: (usize, usize),
        crop: (usize, usize),
        target: (usize, usize),
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let v = [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|x| x as f32);
        Ok(Tensor::new(&v, device)?.unsqueeze(0)?)
    }
}

/// `add_embedding` (a `TimestepEmbedding` MLP) of a `text_time` UNet.
#[derive(Debug, Clone)]
struct AddEmbedding {
    config: TextTimeConfig,
    linear_1: Linear,
    linear_2: Linear,
}

/// The denoising UNet.
#[derive(Debug, Clone)]
pub struct Unet {
    config: UnetConfig,
    time_1: Linear,
    time_2: Linear,
    add_embedding: Option<AddEmbedding>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    layers: Layers,
    /// The dtype it computes in: its weights' as loaded (f32 when the CPU's mixed precision keeps
    /// conv and linear weights in bf16).
    dtype: DType,
}

impl Unet {
    /// Builds the UNet of `config` from `w` (keys as in diffusers' `unet/`), registering its convs
    /// and linears in `layers`.
    pub fn new(w: &Weights, config: &UnetConfig, layers: &Layers) -> Result<Self> {
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let o = BlockOpts {
            temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
            selective_widths: (ch[0], ch[1.min(n - 1)]),
        };
        let conv_in = Conv2d::new(
            &w.pp("conv_in"),
            layers,
            Conv2dSpec::new(c.in_channels, ch[0], c.conv_in_kernel),
        )?;
        let time_1 = Linear::new(&w.pp("time_embedding.linear_1"), layers, ch[0], temb, true)?;
        let time_2 = Linear::new(&w.pp("time_embedding.linear_2"), layers, temb, temb, true)?;
        let add_embedding = match c.addition {
            None => None,
            Some(config) => Some(AddEmbedding {
                config,
                linear_1: Linear::new(
                    &w.pp("add_embedding.linear_1"),
                    layers,
                    config.input_dim,
                    temb,
                    true,
                )?,
                linear_2: Linear::new(&w.pp("add_embedding.linear_2"), layers, temb, temb, true)?,
            }),
        };
        let depth = &c.transformer_layers_per_block;
        let attn = |i: usize, depth: usize| AttnSpec {
            heads: c.heads[i],
            depth,
        };
        let mut down = Vec::new();
        for (i, kind) in c.down_blocks.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let heads = (*kind == DownType::CrossAttn).then_some(attn(i, depth[i]));
            let pad = (i + 1 < n).then_some(c.downsample_padding);
            down.push(DownBlock::new(
                &w.pp("down_blocks").pp(i),
                layers,
                &o,
                cin,
                ch[i],
                c.layers_per_block,
                heads,
                pad,
            )?);
        }
        let mid = MidBlock::new(
            &w.pp("mid_block"),
            layers,
            &o,
            ch[n - 1],
            attn(n - 1, depth[n - 1]),
            c.mid_block_scale_factor,
        )?;
        let mut up = Vec::new();
        for (i, kind) in c.up_blocks.iter().enumerate() {
            let rev = |k: usize| ch[n - 1 - k];
            let channels = UpChannels {
                prev: if i == 0 { ch[n - 1] } else { rev(i - 1) },
                out: rev(i),
                skip_in: rev((i + 1).min(n - 1)),
            };
            let heads = (*kind == UpType::CrossAttn).then_some(attn(n - 1 - i, depth[n - 1 - i]));
            up.push(UpBlock::new(
                &w.pp("up_blocks").pp(i),
                layers,
                &o,
                channels,
                c.layers_per_block + 1,
                heads,
                i + 1 < n,
            )?);
        }
        Ok(Unet {
            dtype: w.dtype(),
            config: c.clone(),
            time_1,
            time_2,
            add_embedding,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(&w.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::new(
                &w.pp("conv_out"),
                layers,
                Conv2dSpec::new(ch[0], c.out_channels, c.conv_out_kernel),
            )?,
            layers: layers.clone(),
        })
    }

    /// Its config.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// The device its weights are on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_out.weight().device()
    }

    /// The dtype it computes in, that of its inputs: its weights' as loaded (f32 also where the
    /// CPU's mixed precision keeps conv and linear weights in bf16).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Its adaptable layers.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    /// The sinusoidal timestep features (`time_proj`), `[b] -> [b, block_out_channels[0]]`, f32.
    pub fn time_proj(&self, timesteps: &Tensor) -> Result<Tensor> {
        self.sinusoidal(timesteps, self.config.block_out_channels[0])
    }

    /// `dim` sinusoidal features of each value of `t` (flattened): `[n, dim]`, f32, as diffusers'
    /// `get_timestep_embedding` with this UNet's `flip_sin_to_cos` and `freq_shift`.
    fn sinusoidal(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let half = dim / 2;
        let device = t.device();
        // exp(-ln(10000) * i / (half - shift)), in f32.
        let exponent =
            (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)? * -(10000f64.ln()))?;
        let freqs = (exponent / (half as f64 - self.config.freq_shift))?.exp()?;
        let t = t.to_dtype(DType::F32)?.flatten_all()?;
        let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut emb = if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        if dim % 2 == 1 {
            emb = emb.pad_with_zeros(1, 0, 1)?;
        }
        Ok(emb)
    }

    /// SDXL's time-id features (`add_time_proj`, flattened per batch element): `[b, 6] ->
    /// [b, 6 * addition_time_embed_dim]`, f32. Errors for a UNet without added conditioning.
    pub fn add_time_proj(&self, time_ids: &Tensor) -> Result<Tensor> {
        let add = self.text_time()?;
        let (b, n) = time_ids.dims2()?;
        if n != TextTimeConfig::TIME_IDS {
            return Err(Error::Input(format!(
                "time ids have {n} values per image, SDXL takes {}",
                TextTimeConfig::TIME_IDS
            )));
        }
        Ok(self
            .sinusoidal(time_ids, add.config.time_embed_dim)?
            .reshape((b, n * add.config.time_embed_dim))?)
    }

    /// The added embedding (`aug_emb`) of SDXL's conditioning: `add_embedding(cat(text_embeds,
    /// add_time_proj(time_ids)))`, `[b, temb]` in `dtype`.
    pub fn added_embedding(&self, cond: &TextTime, dtype: DType) -> Result<Tensor> {
        let add = self.text_time()?;
        let (b, pooled) = cond.text_embeds.dims2()?;
        let want = add.config.pooled_dim();
        if pooled != want {
            return Err(Error::Input(format!(
                "pooled text embeddings are {pooled} wide, this UNet takes {want} (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)"
            )));
        }
        let ids = self.add_time_proj(&cond.time_ids)?;
        if ids.dim(0)? != b {
            return Err(Error::Input(format!(
                "{} sets of time ids for {b} pooled embeddings",
                ids.dim(0)?
            )));
        }
        let x = Tensor::cat(&[cond.text_embeds.to_dtype(DType::F32)?, ids], 1)?.to_dtype(dtype)?;
        add.linear_2.forward(&add.linear_1.forward(&x)?.silu()?)
    }

    /// Whether the UNet takes SDXL's added conditioning.
    pub fn takes_text_time(&self) -> bool {
        self.add_embedding.is_some()
    }

    fn text_time(&self) -> Result<&AddEmbedding> {
        self.add_embedding.as_ref().ok_or_else(|| {
            Error::Input(
                "this UNet has no added conditioning (addition_embed_type is not text_time)".into(),
            )
        })
    }

    /// The time embedding MLP on [`Unet::time_proj`]'s output.
    pub fn time_embedding(&self, proj: &Tensor) -> Result<Tensor> {
        self.time_2.forward(&self.time_1.forward(proj)?.silu()?)
    }

    /// Predicts noise (or `v`) for `sample` at `timesteps` given text `context`, for UNets
    /// without added conditioning (SD 1.x/2.x); see [`Unet::forward_with`].
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// Predicts noise (or `v`) for `sample` at `timesteps` given text `context` and, for SDXL,
    /// the added conditioning `text_time` (required exactly when the config has it).
    ///
    /// # Shapes
    /// `sample [b, in, h, w]`; `timesteps` `[b]`, `[1]` or a scalar (any numeric dtype);
    /// `context [b, 77, cross_attention_dim]`; `text_time`: `[b, pooled]` and `[b, 6]` ->
    /// `[b, out, h, w]`.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        text_time: Option<&TextTime>,
    ) -> Result<Tensor> {
        let (b, cin, _, _) = sample.dims4()?;
        if cin != self.config.in_channels {
            return Err(Error::Input(format!(
                "unet input has {cin} channels, the config says {}",
                self.config.in_channels
            )));
        }
        if context.dims3()?.0 != b || context.dim(2)? != self.config.cross_attention_dim {
            return Err(Error::Input(format!(
                "text context {:?} does not fit a batch of {b} and cross_attention_dim {}",
                context.dims(),
                self.config.cross_attention_dim
            )));
        }
        let t = timesteps.flatten_all()?;
        let t = match t.dim(0)? {
            1 => t.broadcast_as(b)?.contiguous()?,
            n if n == b => t,
            n => return Err(Error::Input(format!("{n} timesteps for a batch of {b}"))),
        };
        let mut temb = self.time_embedding(&self.time_proj(&t)?.to_dtype(sample.dtype())?)?;
        match (text_time, self.takes_text_time()) {
            (Some(cond), true) => {
                let aug = self.added_embedding(cond, sample.dtype())?;
                if aug.dim(0)? != b {
                    return Err(Error::Input(format!(
                        "added conditioning for {} images, a batch of {b}",
                        aug.dim(0)?
                    )));
                }
                temb = (temb + aug)?;
            }
            (None, false) => {}
            (None, true) => {
                return Err(Error::Input(
                    "this UNet (addition_embed_type text_time, SDXL) needs pooled text embeddings and time ids".into(),
                ))
            }
            (Some(_), false) => {
                return Err(Error::Input(
                    "added conditioning given to a UNet without addition_embed_type text_time"
                        .into(),
                ))
            }
        }

        let x = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            let (out, states) = block.forward(&h, &temb, context)?;
            h = out;
            skips.extend(states);
        }
        h = self.mid.forward(&h, &temb, context)?;
        for block in &self.up {
            let k = block.num_skips();
            let mine = skips.split_off(skips.len() - k);
            let up_size = skips.last().map(|s| (s.dim(2), s.dim(3)));
            let up_size = match up_size {
                Some((Ok(a), Ok(b))) => Some((a, b)),
                _ => None,
            };
            h = block.forward(&h, &mine, &temb, context, up_size)?;
        }
        let h = self.norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
