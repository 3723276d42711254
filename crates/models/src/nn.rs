//! Building blocks, all differentiable: convs and linears that take their weight from the adapter
//! hook, normalisations and attention, each on its op from `ops` (fused CPU kernels, or the
//! portable form on every device).
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward (gradients stop silently);
//! nothing here uses them outside a forward whose backward `ops` supplies.

use candle_core::{DType, Tensor};
use ops::conv::ConvConfig;
use ops::group_norm::GroupNormConfig;

use crate::layers::{LayerKind, Layers};
use crate::weights::Weights;
use crate::Result;

/// The dtype a matmul or conv runs in: candle's CPU kernels have no bf16 matmul or conv, so bf16
/// models compute those in f32 on the CPU (weights stay bf16 in memory).
pub(crate) fn compute_dtype(dtype: DType, device: &candle_core::Device) -> DType {
    if dtype == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

/// `w` as a conv or linear op computing in `dt` takes it: a bf16 weight stays bf16 beside f32
/// (the ops read it as f32 themselves, so no f32 copy outlives the op); else in `dt`.
fn weight_in(w: &Tensor, dt: DType) -> Result<Tensor> {
    if dt == DType::F32 && w.dtype() == DType::BF16 {
        Ok(w.clone())
    } else {
        Ok(w.to_dtype(dt)?)
    }
}

/// A conv or linear layer's `weight` at `w`, kept in bf16 where `w` says so
/// ([`Weights::with_bf16_weights`]), registered in `layers` under `w`'s prefix (with `w` to
/// read the original from when it was rounded).
fn load_weight(
    w: &Weights,
    layers: &Layers,
    kind: LayerKind,
    shape: impl Into<candle_core::Shape>,
) -> Result<Tensor> {
    let weight = w.get_kept(shape, "weight")?;
    let rounded = w.bf16_weights() && weight.dtype() == DType::BF16;
    layers.register(w.prefix(), kind, &weight, rounded.then(|| w.reopening()));
    Ok(weight)
}

/// `x @ w^T + bias` for `x [..., din]`, `w [dout, din]` and `bias [dout]`, in
/// [`compute_dtype`], returned in `x`'s dtype; `cache` keeps a frozen `w`'s packed operands.
fn linear_fwd(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cache: &ops::WeightCache,
) -> Result<Tensor> {
    let dt = compute_dtype(x.dtype(), x.device());
    let b = bias.map(|b| b.to_dtype(dt)).transpose()?;
    let (xc, w) = (x.to_dtype(dt)?, weight_in(w, dt)?);
    let y = ops::linear::linear_cached(&xc, &w, b.as_ref(), Some(cache))?;
    Ok(y.to_dtype(x.dtype())?)
}

/// The shape of a conv layer: channels, a square kernel, stride, padding and bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Stride and padding.
    pub conv: ConvConfig,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Conv2dSpec {
    /// A `kernel x kernel` conv from `cin` to `cout` channels with a bias, stride 1 and the
    /// padding that keeps the size (`kernel / 2`).
    pub fn new(cin: usize, cout: usize, kernel: usize) -> Self {
        Conv2dSpec {
            cin,
            cout,
            kernel,
            conv: ConvConfig {
                stride: 1,
                padding: kernel / 2,
            },
            bias: true,
        }
    }

    /// The same with stride `stride`.
    pub fn stride(mut self, stride: usize) -> Self {
        self.conv.stride = stride;
        self
    }

    /// The same with padding `padding`.
    pub fn padding(mut self, padding: usize) -> Self {
        self.conv.padding = padding;
        self
    }
}

/// A 2-d convolution whose weight passes through the adapter hook.
#[derive(Debug, Clone)]
pub struct Conv2d {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    conv: ConvConfig,
    layers: Layers,
    /// The weight's operands as the bf16 products pack them, kept between steps.
    cache: ops::WeightCache,
}

impl Conv2d {
    /// Loads `weight` `[cout, cin, k, k]` (and `bias` `[cout]` if the spec has one) at `w`'s
    /// prefix, which is also the layer's name in `layers`.
    pub fn new(w: &Weights, layers: &Layers, spec: Conv2dSpec) -> Result<Self> {
        let k = spec.kernel;
        let weight = load_weight(w, layers, LayerKind::Conv, (spec.cout, spec.cin, k, k))?;
        let bias = if spec.bias {
            Some(w.get(spec.cout, "bias")?)
        } else {
            None
        };
        Ok(Conv2d {
            name: w.prefix().to_string(),
            weight,
            bias,
            conv: spec.conv,
            layers: layers.clone(),
            cache: ops::WeightCache::new(),
        })
    }

    /// The frozen base weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// # Shapes
    /// `[b, cin, h, w] -> [b, cout, h', w']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = compute_dtype(x.dtype(), x.device());
        let xc = x.to_dtype(dt)?;
        let w = weight_in(&self.weight, dt)?;
        let b = self.bias.as_ref().map(|b| b.to_dtype(dt)).transpose()?;
        // An adapter's W' = Wr T runs as a conv with the base weight and T; T stays in the
        // adapter's dtype (f32 for a half-precision model: T = I + a small update would lose the
        // update in f16), and the op rounds W' to the model's dtype only where it must.
        let y = match self.layers.filter_transform(&self.name)? {
            Some(t) => {
                let (cfg, cache) = (self.conv, Some(&self.cache));
                ops::conv::conv2d_transformed_cached(&xc, &w, b.as_ref(), &t, cfg, cache)?
            }
            None => {
                let w = self.layers.weight(&self.name, &self.weight)?;
                ops::conv::conv2d(&xc, &weight_in(&w, dt)?, b.as_ref(), self.conv)?
            }
        };
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// A linear layer whose weight passes through the adapter hook.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    layers: Layers,
    /// The weight's operands as the bf16 products pack them, kept between steps.
    cache: ops::WeightCache,
}

impl Linear {
    /// Loads `weight` `[dout, din]` (and `bias` `[dout]` if `bias`) at `w`'s prefix.
    pub fn new(w: &Weights, layers: &Layers, din: usize, dout: usize, bias: bool) -> Result<Self> {
        let weight = load_weight(w, layers, LayerKind::Linear, (dout, din))?;
        let bias = if bias {
            Some(w.get(dout, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            name: w.prefix().to_string(),
            weight,
            bias,
            layers: layers.clone(),
            cache: ops::WeightCache::new(),
        })
    }

    /// # Shapes
    /// `[..., din] -> [..., dout]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.weight()?)
    }

    /// The weight as [`Linear::forward`] multiplies by it now: the base weight, a baked one,
    /// or the base with its attached adapters (tracked while they train).
    pub(crate) fn weight(&self) -> Result<Tensor> {
        self.layers.weight(&self.name, &self.weight)
    }

    /// [`Linear::forward`] with `w`, the layer's [`Linear::weight`].
    pub(crate) fn forward_with(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        linear_fwd(x, w, self.bias.as_ref(), &self.cache)
    }
}

/// Group normalisation over `[b, c, ...]`, one op with its own backward ([`ops::group_norm`]).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[channels]`.
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::Input(format!(
                "{}: {channels} channels do not split into {groups} groups",
                w.prefix()
            )));
        }
        Ok(GroupNorm {
            weight: w.get(channels, "weight")?,
            bias: w.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(norm(x))`, in the same op.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let cfg = GroupNormConfig {
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        Ok(ops::group_norm::group_norm(
            x,
            &self.weight,
            &self.bias,
            cfg,
        )?)
    }
}

/// Layer normalisation over the last dimension: one op with its own backward
/// ([`ops::layer_norm`]).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[dim]`.
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(dim, "weight")?,
            bias: w.get(dim, "bias")?,
            eps,
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Softmax attention `softmax(q k^T * scale) v`, differentiable, returned in `v`'s dtype. One
/// chunked op with a recomputing backward ([`ops::attention`]), which computes in f32 for
/// half-precision inputs (so a config's `upcast_attention` always holds) without keeping f32
/// copies of them for the backward.
///
/// # Shapes
/// Heads side by side: `q [b, n, heads * d]`, `k [b, m, heads * d]`, `v [b, m, heads * dv]`
/// -> `[b, n, heads * dv]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    Ok(ops::attention::attention(q, k, v, heads, scale)?)
}
