//! Building blocks, all differentiable: convs and linears that take their weight from the adapter
//! hook, normalisations and attention built from ops that have a backward.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward (gradients stop silently);
//! nothing here uses them.

use candle_core::{DType, Tensor};

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

/// `x @ w^T` for `x [..., din]` and `w [dout, din]`, in [`compute_dtype`], returned in `x`'s dtype.
pub(crate) fn linear_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dt = compute_dtype(x.dtype(), x.device());
    let y = crate::linear::linear(&x.to_dtype(dt)?, &w.to_dtype(dt)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// A 2-d convolution whose weight passes through the adapter hook.
#[derive(Debug, Clone)]
pub struct Conv2d {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    layers: Layers,
}

impl Conv2d {
    /// Loads `weight` `[cout, cin, k, k]` (and `bias` `[cout]` if `bias`) at `w`'s prefix, which is
    /// also the layer's name in `layers`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        layers: &Layers,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get((cout, cin, k, k), "weight")?;
        let bias = if bias {
            Some(w.get(cout, "bias")?)
        } else {
            None
        };
        layers.register(w.prefix(), LayerKind::Conv, &weight);
        Ok(Conv2d {
            name: w.prefix().to_string(),
            weight,
            bias,
            stride,
            padding,
            layers: layers.clone(),
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
        // An atoms adapter's W' = Wr T runs as a conv with the base weight and T, in f32 or f64
        // (T = I + a small update would lose the update in a half-precision dtype).
        let transform = match dt {
            DType::F32 | DType::F64 => self.layers.filter_transform(&self.name)?,
            _ => None,
        };
        let y = match transform {
            Some(atoms::FilterTransform::Matrix(t)) => crate::conv::conv2d_transformed(
                &xc,
                &self.weight.to_dtype(dt)?,
                &t.to_dtype(dt)?,
                self.stride,
                self.padding,
            )?,
            Some(atoms::FilterTransform::Atoms {
                atoms,
                delta,
                scale,
            }) => crate::conv::conv2d_atoms(
                &xc,
                &self.weight.to_dtype(dt)?,
                &atoms.to_dtype(dt)?,
                &delta.to_dtype(dt)?,
                scale,
                self.stride,
                self.padding,
            )?,
            None => {
                let w = self.layers.weight(&self.name, &self.weight)?;
                crate::conv::conv2d(&xc, &w.to_dtype(dt)?, self.stride, self.padding)?
            }
        }
        .to_dtype(x.dtype())?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// A linear layer whose weight passes through the adapter hook.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    layers: Layers,
}

impl Linear {
    /// Loads `weight` `[dout, din]` (and `bias` `[dout]` if `bias`) at `w`'s prefix.
    pub fn new(w: &Weights, layers: &Layers, din: usize, dout: usize, bias: bool) -> Result<Self> {
        let weight = w.get((dout, din), "weight")?;
        let bias = if bias {
            Some(w.get(dout, "bias")?)
        } else {
            None
        };
        layers.register(w.prefix(), LayerKind::Linear, &weight);
        Ok(Linear {
            name: w.prefix().to_string(),
            weight,
            bias,
            layers: layers.clone(),
        })
    }

    /// # Shapes
    /// `[..., din] -> [..., dout]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.layers.weight(&self.name, &self.weight)?;
        let y = linear_fwd(x, &w)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Group normalisation over `[b, c, ...]`, one op with its own backward on the CPU
/// ([`crate::group_norm`]).
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
        if groups == 0 || channels % groups != 0 {
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
        crate::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }

    /// `silu(norm(x))`, in the same op.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }
}

/// Layer normalisation over the last dimension: one op with its own backward on the CPU
/// ([`crate::layer_norm`]), differentiable candle ops elsewhere.
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
        crate::layer_norm::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Softmax attention `softmax(q k^T * scale) v`, differentiable; computed in f32 when `upcast`
/// or when inputs are half precision, and returned in `v`'s dtype. On the CPU it runs as one
/// chunked op with a recomputing backward ([`crate::attention`]).
///
/// # Shapes
/// Heads side by side: `q [b, n, heads * d]`, `k [b, m, heads * d]`, `v [b, m, heads * dv]`
/// -> `[b, n, heads * dv]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    let dtype = v.dtype();
    let dt = if upcast || matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    let o = crate::attention::attention_fused(
        &q.to_dtype(dt)?,
        &k.to_dtype(dt)?,
        &v.to_dtype(dt)?,
        heads,
        scale,
    )?;
    Ok(o.to_dtype(dtype)?)
}
