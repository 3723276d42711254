//! `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s: self-attention,
//! cross-attention to the text, GEGLU feed-forward.

use candle_core::Tensor;

use super::text_kv::TextKv;
use crate::layers::Layers;
use crate::nn::{attention, Conv2d, Conv2dSpec, GroupNorm, LayerNorm, Linear};
use crate::weights::Weights;
use crate::Result;

/// diffusers' `Attention` (no bias on q, k, v; `to_out.0` with bias).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// The text's keys and values, kept between calls (cross-attention).
    text_kv: TextKv,
}

impl Attention {
    /// Loads an attention of `heads` heads of `head_dim`, attending to `context_dim`-wide inputs.
    pub fn new(
        w: &Weights,
        layers: &Layers,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::new(&w.pp("to_q"), layers, dim, inner, false)?,
            to_k: Linear::new(&w.pp("to_k"), layers, context_dim, inner, false)?,
            to_v: Linear::new(&w.pp("to_v"), layers, context_dim, inner, false)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), layers, inner, dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            text_kv: TextKv::default(),
        })
    }

    /// # Shapes
    /// `x [b, n, dim]`, `context [b, m, context_dim]` (self-attention when `None`) -> `[b, n, dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (k, v) = match context {
            Some(text) => self.text_kv.project(text, (&self.to_k, &self.to_v))?,
            None => (self.to_k.forward(x)?, self.to_v.forward(x)?),
        };
        let o = attention(&self.to_q.forward(x)?, &k, &v, self.heads, self.scale)?;
        self.to_out.forward(&o)
    }
}

/// GEGLU feed-forward: `net.2(h * gelu(gate))` with `h, gate = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(w: &Weights, layers: &Layers, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::new(&w.pp("net.0.proj"), layers, dim, inner * 2, true)?,
            out: Linear::new(&w.pp("net.2"), layers, inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&ops::geglu::geglu(&self.proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        w: &Weights,
        layers: &Layers,
        dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        let hd = dim / heads;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&w.pp("attn1"), layers, dim, dim, heads, hd)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&w.pp("attn2"), layers, dim, context_dim, heads, hd)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&w.pp("ff"), layers, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` over a feature map.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    selective_checkpoint: bool,
    name: String,
    layers: Layers,
}

/// Shape options of a [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerOpts {
    /// Channels of the feature map (= heads x head size).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the text embeddings.
    pub context_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Group norm groups.
    pub groups: usize,
    /// Linear projections instead of 1x1 convs.
    pub linear_projection: bool,
    /// Whether [`crate::Checkpointing::Selective`] checkpoints this block.
    pub selective_checkpoint: bool,
}

impl Transformer2D {
    /// Loads a transformer at `w`'s prefix.
    pub fn new(w: &Weights, layers: &Layers, o: TransformerOpts) -> Result<Self> {
        let c = o.channels;
        let proj = |name: &str| -> Result<Proj> {
            Ok(if o.linear_projection {
                Proj::Linear(Linear::new(&w.pp(name), layers, c, c, true)?)
            } else {
                Proj::Conv(Conv2d::new(&w.pp(name), layers, Conv2dSpec::new(c, c, 1))?)
            })
        };
        Ok(Transformer2D {
            norm: GroupNorm::new(&w.pp("norm"), o.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..o.depth)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &w.pp("transformer_blocks").pp(i),
                        layers,
                        c,
                        o.context_dim,
                        o.heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
            selective_checkpoint: o.selective_checkpoint,
            name: w.prefix().to_string(),
            layers: layers.clone(),
        })
    }

    /// # Shapes
    /// `x [b, c, h, w]`, `context [b, m, context_dim]` -> `[b, c, h, w]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        if !self
            .layers
            .checkpointing()
            .covers(self.selective_checkpoint)
        {
            return self.forward_plain(x, context);
        }
        let block = self.clone();
        let f: crate::checkpoint::BlockFn =
            std::sync::Arc::new(move |x: &Tensor, c: &Tensor| block.forward_plain(x, c));
        let params = self.layers.vars_under(&self.name);
        crate::checkpoint::checkpoint(f, x, context, params)
    }

    fn forward_plain(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = self.norm.forward(x)?;
        let to_seq =
            |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let mut y = match &self.proj_in {
            Proj::Conv(p) => to_seq(&p.forward(&y)?)?,
            Proj::Linear(p) => p.forward(&to_seq(&y)?)?,
        };
        for block in &self.blocks {
            y = block.forward(&y, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let y = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_map(&y)?)?,
            Proj::Linear(p) => to_map(&p.forward(&y)?)?,
        };
        Ok((y + x)?)
    }
}
