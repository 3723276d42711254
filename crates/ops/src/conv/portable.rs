//! The portable convolutions: candle tensor ops on every device, with backwards that compute
//! only what is tracked.
//!
//! - forward: candle's `conv2d` (im2col and one GEMM, cuBLAS on CUDA), with `W' = Wr T` formed
//!   in `T`'s dtype and rounded to the input's for an adapted conv;
//! - input gradient: the full correlation of `dy` (dilated by the stride) with the flipped,
//!   transposed kernel, again candle's `conv2d` (so a GEMM, not candle's direct
//!   `conv_transpose2d` loop); one matmul for a 1x1 conv;
//! - kernel gradient `dL/dW'`: the conv of the input with `dy` as kernel, batch and channels
//!   swapped (dilation = stride); one matmul for a 1x1 conv. For an adapted conv,
//!   `dL/dT = Wr^T dL/dW'` and `dL/d(dD) = scale D0 dL/dT`.

use candle_core::Tensor;

use super::{add_bias, transformed_kernel, ConvConfig, FilterTransform};
use crate::handoff::{self, Backward};
use crate::Result;

/// The plain conv, with a frozen bias added inside the op.
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: ConvConfig,
) -> Result<Tensor> {
    let y = x
        .detach()
        .conv2d(&w.detach(), cfg.padding, cfg.stride, 1, 1)?;
    let bias = bias.map(Tensor::detach);
    handoff::attach(add_bias(y, bias.as_ref())?, &[x, w], ConvGrad { cfg })
}

struct ConvGrad {
    cfg: ConvConfig,
}

impl Backward for ConvGrad {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-portable"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let &[x, w] = inputs else {
            candle_core::bail!("{}: two inputs expected", self.name());
        };
        let dy = dy.detach().to_dtype(x.dtype())?;
        let dx = x
            .track_op()
            .then(|| {
                let k = grad_kernel(&channels_first(&w.detach())?, None, w.dims())?;
                input_grad(&dy, &k, x.dims(), self.cfg)
            })
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| {
                let g = kernel_grad(&x.detach(), &dy, w.dims(), self.cfg)?;
                from_channels_first(&g, w.dims())
            })
            .transpose()?;
        Ok(vec![dx, dw])
    }
}

/// The conv with `W' = Wr T` (`third` is `T`, or `dD` with `atoms = Some((D0, scale))`) and a
/// frozen bias.
pub(super) fn conv2d_transformed(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    third: &Tensor,
    atoms: Option<(Tensor, f64)>,
    cfg: ConvConfig,
) -> Result<Tensor> {
    let grad = TransformedGrad {
        cfg,
        atoms: atoms.map(|(d0, s)| (d0.detach(), s)),
    };
    let wt = grad.kernel(&w.detach(), &third.detach())?;
    let y = x.detach().conv2d(&wt, cfg.padding, cfg.stride, 1, 1)?;
    drop(wt);
    let bias = bias.map(Tensor::detach);
    handoff::attach(add_bias(y, bias.as_ref())?, &[x, w, third], grad)
}

struct TransformedGrad {
    cfg: ConvConfig,
    atoms: Option<(Tensor, f64)>,
}

impl TransformedGrad {
    /// `T` from the op's third input (`T` itself, or `dD`), in that input's dtype.
    fn transform(&self, third: &Tensor) -> Result<Tensor> {
        match &self.atoms {
            Some((d0, s)) => FilterTransform::Atoms {
                atoms: d0.clone(),
                delta: third.clone(),
                scale: *s,
            }
            .matrix(),
            None => Ok(third.clone()),
        }
    }

    /// `W' = Wr T` in `w`'s dtype.
    fn kernel(&self, w: &Tensor, third: &Tensor) -> Result<Tensor> {
        transformed_kernel(w, &self.transform(third)?)?.to_dtype(w.dtype())
    }
}

impl Backward for TransformedGrad {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-transformed-portable"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let &[x, w, third] = inputs else {
            candle_core::bail!("{}: three inputs expected", self.name());
        };
        let (xd, td) = (x.detach(), third.detach());
        let dy = dy.detach().to_dtype(x.dtype())?;
        let t = self.transform(&td)?;
        let ws = w.dims();
        // W with input channels first, [c, o, d]: the layout both the input gradient's kernel
        // and dL/dT are formed in (one transposed copy of the weight per backward)
        let wcf = channels_first(&w.detach())?;
        let dx = if x.track_op() {
            let k = grad_kernel(&wcf, Some(&t), ws)?;
            Some(input_grad(&dy, &k, x.dims(), self.cfg)?)
        } else {
            None
        };
        if !(w.track_op() || third.track_op()) {
            return Ok(vec![dx, None, None]);
        }
        // dL/dW' in the same layout, in T's dtype
        let dwcf = kernel_grad(&xd, &dy, ws, self.cfg)?.to_dtype(t.dtype())?;
        let (c, o, d) = dwcf.dims3()?;
        let wcf = wcf.to_dtype(t.dtype())?;
        let dthird = if third.track_op() {
            // dL/dT = Wr^T dL/dW', summed over every filter (per input channel when T is)
            let dt = if t.rank() == 3 {
                wcf.transpose(1, 2)?.contiguous()?.matmul(&dwcf)?
            } else {
                wcf.reshape((c * o, d))?
                    .t()?
                    .matmul(&dwcf.reshape((c * o, d))?)?
            };
            Some(match &self.atoms {
                // T = I + s D0^T dD: dL/d(dD) = s D0 dL/dT
                Some((d0, s)) => (d0.matmul(&dt)? * *s)?,
                None => dt,
            })
        } else {
            None
        };
        // A tracked base kernel (not how adapters use this op, but correct): with W' = Wr T,
        // dL/dWr = dL/dW' T^T.
        let dw = if w.track_op() {
            let dw = if t.rank() == 3 {
                dwcf.matmul(&t.transpose(1, 2)?.contiguous()?)?
            } else {
                dwcf.reshape((c * o, d))?
                    .matmul(&t.t()?)?
                    .reshape((c, o, d))?
            };
            Some(from_channels_first(&dw.to_dtype(w.dtype())?, ws)?)
        } else {
            None
        };
        Ok(vec![dx, dw, dthird])
    }
}

/// Whether a conv of kernel `ws` at `cfg` reads each input pixel once (a matmul over channels).
fn pointwise(ws: &[usize], cfg: ConvConfig) -> bool {
    ws[2] == 1 && ws[3] == 1 && cfg.stride == 1 && cfg.padding == 0
}

/// `dL/dx` for `x` of shape `xs` from `dy` and `wf`, the conv's kernel as [`grad_kernel`] makes
/// it.
fn input_grad(dy: &Tensor, wf: &Tensor, xs: &[usize], cfg: ConvConfig) -> Result<Tensor> {
    let (b, _, ho, wo) = dy.dims4()?;
    let (h, wd) = (xs[2], xs[3]);
    let (c, o, kh, kw) = wf.dims4()?;
    if pointwise(&[o, c, kh, kw], cfg) {
        // dx_b = W^T dy_b
        return wf
            .reshape((c, o))?
            .broadcast_matmul(&dy.reshape((b, o, ho * wo))?)?
            .reshape((b, c, h, wd));
    }
    let (s, p) = (cfg.stride, cfg.padding);
    let dy = if s > 1 { dilate(dy, s)? } else { dy.clone() };
    // The full correlation of the dilated dy with the flipped kernel covers the padded input
    // rows 0 .. (ho - 1) s + kh; rows past that (a stride's remainder) get no gradient.
    let (lh, lw) = (dy.dim(2)?, dy.dim(3)?);
    let (extra_h, extra_w) = (h + 2 * p - (lh + kh - 1), wd + 2 * p - (lw + kw - 1));
    if extra_h == 0 && extra_w == 0 && kh == kw && p < kh {
        // the common case, stride 1: padding kh - 1 - p on every side gives exactly x's rows
        return dy.conv2d(wf, kh - 1 - p, 1, 1, 1);
    }
    dy.pad_with_zeros(2, kh - 1, kh - 1 + extra_h)?
        .pad_with_zeros(3, kw - 1, kw - 1 + extra_w)?
        .conv2d(wf, 0, 1, 1, 1)?
        .narrow(2, p, h)?
        .narrow(3, p, wd)
}

/// `dL/dW` for a kernel of shape `ws` = `[o, c, kh, kw]`, from the input `x` and `dy`, with
/// input channels first: `[c, o, kh kw]`.
fn kernel_grad(x: &Tensor, dy: &Tensor, ws: &[usize], cfg: ConvConfig) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (_, o, ho, wo) = dy.dims4()?;
    let (kh, kw) = (ws[2], ws[3]);
    if pointwise(ws, cfg) {
        // dW^T = sum_b x_b dy_b^T
        let dw = x
            .reshape((b, c, h * wd))?
            .matmul(&dy.reshape((b, o, ho * wo))?.t()?)?
            .sum(0)?;
        return dw.reshape((c, o, 1));
    }
    // dW[o, c, i, j] = sum_b sum_pixels dy[b, o, p] x_pad[b, c, s p + (i, j)]: a conv of x^T
    // ([c, b, h, w], channels b) with dy^T ([o, b, ho, wo]) as kernel, dilated by the stride,
    // whose output [c, o, ., .] starts with the kernel's taps
    let xt = x.transpose(0, 1)?.contiguous()?;
    let dyt = dy.transpose(0, 1)?.contiguous()?;
    let g = xt.conv2d(&dyt, cfg.padding, 1, cfg.stride, 1)?;
    let g = if g.dim(2)? == kh && g.dim(3)? == kw {
        g
    } else {
        g.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()?
    };
    g.reshape((c, o, kh * kw))
}

/// `w [o, c, kh, kw]` as `[c, o, kh kw]`, contiguous.
fn channels_first(w: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    w.reshape((o, c, kh * kw))?.transpose(0, 1)?.contiguous()
}

/// The inverse of [`channels_first`], to the kernel shape `ws`.
fn from_channels_first(g: &Tensor, ws: &[usize]) -> Result<Tensor> {
    g.transpose(0, 1)?.contiguous()?.reshape(ws)
}

/// The kernel whose conv with `dy` gives the input gradient: the conv's kernel (`W`, or
/// `W' = Wr T`) with input and output channels swapped and its taps in reverse order,
/// `[c, o, kh, kw]`, in `wcf`'s dtype, from `wcf` = [`channels_first`] of `W` (kernel shape
/// `ws`). Reversing both kernel axes reverses each filter's taps, and for `W' = Wr T` that is
/// `Wr` times `T` with its columns reversed: one product (or one gather), never `W'` itself.
fn grad_kernel(wcf: &Tensor, t: Option<&Tensor>, ws: &[usize]) -> Result<Tensor> {
    let (c, o, d) = wcf.dims3()?;
    let rev: Vec<u32> = (0..d as u32).rev().collect();
    let rev = Tensor::new(rev.as_slice(), wcf.device())?;
    let k = match t {
        Some(t) => {
            // T[c] (or T) with its columns reversed, then per input channel W[:, c] T[c]
            let tr = t.index_select(&rev, t.rank() - 1)?;
            let w = wcf.to_dtype(t.dtype())?;
            let k = if t.rank() == 3 {
                w.matmul(&tr)?
            } else {
                w.reshape((c * o, d))?.matmul(&tr)?
            };
            k.to_dtype(wcf.dtype())?
        }
        None if d > 1 => wcf.index_select(&rev, 2)?,
        None => wcf.clone(),
    };
    k.reshape((c, o, ws[2], ws[3]))
}

/// `x [b, c, h, w]` with `s - 1` zeros between neighbouring pixels: `[b, c, (h-1)s+1, (w-1)s+1]`.
fn dilate(x: &Tensor, s: usize) -> Result<Tensor> {
    let spread = |x: &Tensor, dim: usize| -> Result<Tensor> {
        let n = x.dim(dim)?;
        let mut parts = vec![x.clone()];
        parts.resize(s, x.zeros_like()?);
        let mut shape = x.dims().to_vec();
        shape[dim] = n * s;
        Tensor::stack(&parts, dim + 1)?
            .reshape(shape)?
            .narrow(dim, 0, (n - 1) * s + 1)
    };
    spread(&spread(x, 3)?, 2)
}
