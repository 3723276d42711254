//! The UNet's down, mid and up blocks (`CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`) and its resamplers.

use candle_core::Tensor;

use super::transformer::{Transformer2D, TransformerOpts};
use crate::layers::Layers;
use crate::nn::{Conv2d, Conv2dSpec};
use crate::resnet::{ResnetBlock, ResnetOpts};
use crate::weights::Weights;
use crate::Result;

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockOpts {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
    /// The widest resnet and transformer that [`crate::Checkpointing::Selective`] checkpoints:
    /// the first level's channels for resnets, the second level's for transformers (where a
    /// block's activations are largest for the work of recomputing it).
    pub selective_widths: (usize, usize),
}

impl BlockOpts {
    fn resnet(&self, cin: usize, cout: usize, scale: f64) -> ResnetOpts {
        ResnetOpts {
            cin,
            cout,
            temb: Some(self.temb),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: scale,
            selective_checkpoint: cout <= self.selective_widths.0,
        }
    }

    fn transformer(&self, channels: usize, attn: AttnSpec) -> TransformerOpts {
        TransformerOpts {
            channels,
            heads: attn.heads,
            context_dim: self.context_dim,
            depth: attn.depth,
            groups: self.groups,
            linear_projection: self.linear_projection,
            selective_checkpoint: channels <= self.selective_widths.1,
        }
    }
}

/// The transformers of a cross-attention block: heads, and transformer blocks per transformer.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttnSpec {
    pub heads: usize,
    pub depth: usize,
}

/// `Downsample2D` with a conv: stride 2, `padding` on every side (0: pad right and bottom by 1).
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pad_right_bottom {
            x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
        } else {
            x.clone()
        };
        self.conv.forward(&x)
    }
}

/// A down block: resnets (each followed by a transformer in cross-attention blocks), then an
/// optional downsampler.
#[derive(Debug, Clone)]
pub(super) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        w: &Weights,
        layers: &Layers,
        o: &BlockOpts,
        cin: usize,
        cout: usize,
        n: usize,
        attn: Option<AttnSpec>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..n {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock::new(
                &w.pp("resnets").pp(i),
                layers,
                o.resnet(c, cout, 1.0),
            )?);
            if let Some(h) = attn {
                attentions.push(Transformer2D::new(
                    &w.pp("attentions").pp(i),
                    layers,
                    o.transformer(cout, h),
                )?);
            }
        }
        let downsample = match downsample_padding {
            None => None,
            Some(p) => Some(Downsample {
                conv: Conv2d::new(
                    &w.pp("downsamplers.0.conv"),
                    layers,
                    Conv2dSpec::new(cout, cout, 3).stride(2).padding(p),
                )?,
                pad_right_bottom: p == 0,
            }),
        };
        Ok(DownBlock {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Returns the block's output and every intermediate state the up path concatenates.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::new();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context)?;
            }
            states.push(h.clone());
        }
        if let Some(d) = &self.downsample {
            h = d.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) once.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    first: ResnetBlock,
    attention: Transformer2D,
    second: ResnetBlock,
}

impl MidBlock {
    pub(super) fn new(
        w: &Weights,
        layers: &Layers,
        o: &BlockOpts,
        c: usize,
        attn: AttnSpec,
        scale: f64,
    ) -> Result<Self> {
        Ok(MidBlock {
            first: ResnetBlock::new(&w.pp("resnets.0"), layers, o.resnet(c, c, scale))?,
            attention: Transformer2D::new(&w.pp("attentions.0"), layers, o.transformer(c, attn))?,
            second: ResnetBlock::new(&w.pp("resnets.1"), layers, o.resnet(c, c, scale))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x, Some(temb))?;
        let h = self.attention.forward(&h, context)?;
        self.second.forward(&h, Some(temb))
    }
}

/// An up block: resnets on the concatenation of the running state and a skip state (each followed
/// by a transformer in cross-attention blocks), then an optional nearest-2x upsampler and conv.
#[derive(Debug, Clone)]
pub(super) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

/// Channel sizes of an up block, as diffusers derives them.
pub(super) struct UpChannels {
    /// The output channels of the previous up block (or the mid block).
    pub prev: usize,
    /// This block's output channels.
    pub out: usize,
    /// The channels of the down block it mirrors one level deeper (its last skip state).
    pub skip_in: usize,
}

impl UpBlock {
    pub(super) fn new(
        w: &Weights,
        layers: &Layers,
        o: &BlockOpts,
        ch: UpChannels,
        n: usize,
        attn: Option<AttnSpec>,
        upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..n {
            let skip = if i == n - 1 { ch.skip_in } else { ch.out };
            let res_in = if i == 0 { ch.prev } else { ch.out };
            resnets.push(ResnetBlock::new(
                &w.pp("resnets").pp(i),
                layers,
                o.resnet(res_in + skip, ch.out, 1.0),
            )?);
            if let Some(h) = attn {
                attentions.push(Transformer2D::new(
                    &w.pp("attentions").pp(i),
                    layers,
                    o.transformer(ch.out, h),
                )?);
            }
        }
        let upsample = if upsample {
            Some(Conv2d::new(
                &w.pp("upsamplers.0.conv"),
                layers,
                Conv2dSpec::new(ch.out, ch.out, 3),
            )?)
        } else {
            None
        };
        Ok(UpBlock {
            resnets,
            attentions,
            upsample,
        })
    }

    /// Number of skip states the block consumes.
    pub(super) fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` in the order they were produced; the last is used first. `up_size` is the spatial
    /// size to upsample to (twice the input unless the latent size is odd somewhere).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        up_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = Tensor::cat(&[&h, skip], 1)?;
            h = r.forward(&h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context)?;
            }
        }
        if let Some(conv) = &self.upsample {
            let (_, _, hh, ww) = h.dims4()?;
            let (th, tw) = up_size.unwrap_or((2 * hh, 2 * ww));
            // In f32 for bf16 on the CPU: the upsample's backward is a grouped conv, which
            // candle's CPU kernels do not have in bf16.
            let dt = crate::nn::compute_dtype(h.dtype(), h.device());
            let up = h
                .to_dtype(dt)?
                .upsample_nearest2d(th, tw)?
                .to_dtype(h.dtype())?;
            h = conv.forward(&up)?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Selective checkpointing covers the first level's resnets and the first two levels'
    /// transformers (SD 1.5's widths), and nothing wider.
    #[test]
    fn selective_checkpointing_picks_the_wide_activation_blocks() {
        let o = BlockOpts {
            temb: 1280,
            groups: 32,
            eps: 1e-5,
            context_dim: 768,
            linear_projection: false,
            selective_widths: (320, 640),
        };
        // resnets by output width: level 0 down and up (inputs of up to 960 channels)
        assert!(o.resnet(320, 320, 1.0).selective_checkpoint);
        assert!(o.resnet(960, 320, 1.0).selective_checkpoint);
        assert!(!o.resnet(320, 640, 1.0).selective_checkpoint);
        assert!(!o.resnet(1280, 1280, 1.0).selective_checkpoint);
        let a = AttnSpec { heads: 8, depth: 1 };
        assert!(o.transformer(320, a).selective_checkpoint);
        assert!(o.transformer(640, a).selective_checkpoint);
        assert!(!o.transformer(1280, a).selective_checkpoint);
    }
}
