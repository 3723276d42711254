//! `ResnetBlock2D`, shared by the UNet (with a time embedding) and the VAE (without).

use candle_core::Tensor;

use crate::layers::Layers;
use crate::nn::{Conv2d, Conv2dSpec, GroupNorm, Linear};
use crate::weights::Weights;
use crate::Result;

/// diffusers' `ResnetBlock2D` with `time_embedding_norm = "default"`.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    selective_checkpoint: bool,
    name: String,
    layers: Layers,
}

/// Shape options of a [`ResnetBlock`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetOpts {
    /// Channels in.
    pub cin: usize,
    /// Channels out.
    pub cout: usize,
    /// Width of the time embedding, if any.
    pub temb: Option<usize>,
    /// Group norm groups.
    pub groups: usize,
    /// Group norm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// Whether [`crate::Checkpointing::Selective`] checkpoints this block.
    pub selective_checkpoint: bool,
}

impl ResnetBlock {
    /// Loads a block at `w`'s prefix.
    pub fn new(w: &Weights, layers: &Layers, o: ResnetOpts) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&w.pp("norm1"), o.groups, o.cin, o.eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), layers, Conv2dSpec::new(o.cin, o.cout, 3))?,
            time_emb_proj: match o.temb {
                Some(t) => Some(Linear::new(
                    &w.pp("time_emb_proj"),
                    layers,
                    t,
                    o.cout,
                    true,
                )?),
                None => None,
            },
            norm2: GroupNorm::new(&w.pp("norm2"), o.groups, o.cout, o.eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), layers, Conv2dSpec::new(o.cout, o.cout, 3))?,
            conv_shortcut: if o.cin != o.cout {
                Some(Conv2d::new(
                    &w.pp("conv_shortcut"),
                    layers,
                    Conv2dSpec::new(o.cin, o.cout, 1),
                )?)
            } else {
                None
            },
            output_scale_factor: o.output_scale_factor,
            selective_checkpoint: o.selective_checkpoint,
            name: w.prefix().to_string(),
            layers: layers.clone(),
        })
    }

    /// # Shapes
    /// `x [b, cin, h, w]`, `temb [b, t]` -> `[b, cout, h, w]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        if !self
            .layers
            .checkpointing()
            .covers(self.selective_checkpoint)
        {
            return self.forward_plain(x, temb);
        }
        let block = self.clone();
        let has_temb = temb.is_some();
        let f: crate::checkpoint::BlockFn = std::sync::Arc::new(move |x: &Tensor, t: &Tensor| {
            block.forward_plain(x, has_temb.then_some(t))
        });
        let aux = match temb {
            Some(t) => t.clone(),
            None => Tensor::zeros(1, x.dtype(), x.device())?,
        };
        let params = self.layers.vars_under(&self.name);
        crate::checkpoint::checkpoint(f, x, &aux, params)
    }

    fn forward_plain(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        Ok(if self.output_scale_factor == 1.0 {
            out
        } else {
            (out / self.output_scale_factor)?
        })
    }
}
