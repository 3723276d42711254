//! 2-d convolutions whose backward computes only the gradients someone needs: the plain conv
//! ([`conv2d`]), and the conv of an adapted layer whose kernel is `W' = Wr T`
//! ([`conv2d_transformed`]; DESIGN.md 1.1: every filter of `W` times a `d x d` transform).
//!
//! candle's own conv2d backward computes the kernel gradient of every conv, frozen or not, and
//! the input gradient with a direct `conv_transpose2d` loop several times slower than a conv
//! (PERF-NOTES: 434 ms against PyTorch's 56 ms for a 320-channel 3x3 conv at 64x64). Here the
//! input gradient is computed only for a tracked input and the kernel gradient (or `dL/dT`) only
//! for a tracked kernel (or transform), by the fused CPU kernels (`fused.rs`,
//! `fused_transformed.rs`: im2col and gemm, `T` applied to the columns) or by the portable
//! form (`portable.rs`: candle's conv2d, which is im2col and one GEMM on CUDA and the CPU, with
//! the input gradient as a conv of `dy` with the flipped kernel). [`conv2d_slow`] and
//! [`transformed_kernel`] are the references the tests hold both to.

use candle_core::Tensor;

use crate::kernels;
use crate::weight_cache::WeightCache;
use crate::Result;

mod channel_grads;
mod fused;
mod fused_transformed;
mod packed;
mod portable;
pub mod winograd;

/// Stride and padding of a conv (dilation 1, one group), like candle-nn's `Conv2dConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// The step between output pixels, in input pixels.
    pub stride: usize,
    /// Zeros added on each side of the input.
    pub padding: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig {
            stride: 1,
            padding: 0,
        }
    }
}

/// A transform `T` with `W' = Wr T`: what an adapter gives a conv to run with instead of its
/// base kernel (`atoms::Adapter::filter_transform`).
#[derive(Debug, Clone)]
pub enum FilterTransform {
    /// `T` itself: `[d, d]`, or `[c, d, d]` with one per input channel (per input group for a
    /// linear layout).
    Matrix(Tensor),
    /// `T = I + scale D0^T dD` from an atoms adapter's frozen atoms `D0 [m, d]` and its tuned
    /// `dD [m, d]`: the conv forms `T` inside its own op, with no graph node per layer.
    Atoms {
        /// `D0 [m, d]`, frozen.
        atoms: Tensor,
        /// `dD [m, d]`, the trainable variable.
        delta: Tensor,
        /// The adapter's scale.
        scale: f64,
    },
}

impl FilterTransform {
    /// `T` as a tensor, from candle ops (differentiable in `dD`), in the dtype of its parts.
    pub fn matrix(&self) -> Result<Tensor> {
        match self {
            FilterTransform::Matrix(t) => Ok(t.clone()),
            FilterTransform::Atoms {
                atoms,
                delta,
                scale,
            } => {
                let eye = Tensor::eye(atoms.dim(1)?, atoms.dtype(), atoms.device())?;
                let update = atoms.t()?.matmul(delta)?;
                let update = if *scale == 1.0 {
                    update
                } else {
                    (update * *scale)?
                };
                eye + update
            }
        }
    }
}

/// `x [b, c, h, w]` convolved with `w [o, c, kh, kw]`, plus `bias [o]`: `[b, o, ho, wo]`. A
/// frozen bias is added inside the op (the graph keeps the output once), a tracked one by candle.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: ConvConfig) -> Result<Tensor> {
    check(x, w, bias, cfg)?;
    let (frozen, tracked) = kernels::split_bias(bias);
    let (w, fused) = kernels::weight_and_path(x, w, &[])?;
    let y = if fused {
        fused::conv2d(x, &w, frozen, cfg)?
    } else {
        portable::conv2d(x, &w, frozen, cfg)?
    };
    add_bias(y, tracked)
}

/// `y + bias` for `bias [o]` over `y [b, o, h, w]`: by candle's autograd for a tracked bias,
/// or, on detached tensors, inside a portable op's forward.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// `x` convolved with the kernel `W' = Wr T`, plus `bias [o]` (as in [`conv2d`]), where `Wr` is `w [o, c, kh, kw]` seen as `o c`
/// filters of `d = kh kw` numbers and `T` is `[d, d]` (every filter) or `[c, d, d]` (the filters
/// reading input channel `c`). Gradients reach `x`, `w` and `T` (or `dD`), each only when
/// tracked. `T` is formed and applied in its own dtype (f32 for the adapters of a half-precision
/// model: `T = I + a small update` would lose the update in f16), and `W'` is then rounded to
/// `x`'s dtype, as autocast rounds a weight at each op.
pub fn conv2d_transformed(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    t: &FilterTransform,
    cfg: ConvConfig,
) -> Result<Tensor> {
    conv2d_transformed_cached(x, w, bias, t, cfg, None)
}

/// [`conv2d_transformed`] for a layer that keeps its frozen `w`'s packed operands in `cache`
/// between training steps ([`crate::weight_cache`]), where the bf16 products run it; the same numbers.
pub fn conv2d_transformed_cached(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    t: &FilterTransform,
    cfg: ConvConfig,
    cache: Option<&WeightCache>,
) -> Result<Tensor> {
    check(x, w, bias, cfg)?;
    let (_, c, kh, kw) = w.dims4()?;
    let d = kh * kw;
    let (third, atoms) = match t {
        FilterTransform::Matrix(t) => {
            let want: &[usize] = if t.rank() == 3 { &[c, d, d] } else { &[d, d] };
            if t.dims() != want {
                candle_core::bail!(
                    "conv2d_transformed: transform {:?} does not fit kernel {:?} (expected {want:?})",
                    t.dims(),
                    w.dims()
                );
            }
            (t, None)
        }
        FilterTransform::Atoms {
            atoms,
            delta,
            scale,
        } => {
            let (_, d0) = atoms.dims2()?;
            if d0 != d || delta.dims() != atoms.dims() || delta.dtype() != atoms.dtype() {
                candle_core::bail!(
                    "conv2d_transformed: atoms {:?} ({:?}) and update {:?} ({:?}) do not fit kernel {:?}",
                    atoms.dims(),
                    atoms.dtype(),
                    delta.dims(),
                    delta.dtype(),
                    w.dims()
                );
            }
            (delta, Some((atoms.clone(), *scale)))
        }
    };
    let (frozen, tracked) = kernels::split_bias(bias);
    let kept = cache.and_then(|c| c.for_weight(w, x.track_op() || third.track_op()));
    let (w, fused) = kernels::weight_and_path(x, w, &[third])?;
    let y = if fused {
        fused_transformed::conv2d_transformed(x, &w, frozen, (third, atoms), cfg, kept)?
    } else {
        portable::conv2d_transformed(x, &w, frozen, third, atoms, cfg)?
    };
    add_bias(y, tracked)
}

/// `W' = Wr T` (or `Wr[., c] T[c]`) shaped like `w`, from candle ops, in `t`'s dtype: the
/// kernel [`conv2d_transformed`] stands for.
pub fn transformed_kernel(w: &Tensor, t: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    let d = kh * kw;
    let w = w.to_dtype(t.dtype())?;
    let wt = if t.rank() == 3 {
        w.reshape((o, c, d))?
            .transpose(0, 1)?
            .matmul(t)?
            .transpose(0, 1)?
    } else {
        w.reshape((o * c, d))?.matmul(t)?
    };
    wt.reshape((o, c, kh, kw))
}

/// The plain conv from candle's own conv2d and autograd: the reference.
pub fn conv2d_slow(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: ConvConfig,
) -> Result<Tensor> {
    add_bias(x.conv2d(w, cfg.padding, cfg.stride, 1, 1)?, bias)
}

/// Shapes and dtypes a conv can run on, or an error that names them.
fn check(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: ConvConfig) -> Result<()> {
    let (xs, ws) = (x.dims(), w.dims());
    let (&[_, c, h, wd], &[_, c2, kh, kw]) = (xs, ws) else {
        candle_core::bail!("conv2d expects [b, c, h, w] and [o, c, kh, kw], got {xs:?} and {ws:?}");
    };
    let p = cfg.padding;
    if c != c2 || h + 2 * p < kh || wd + 2 * p < kw || cfg.stride == 0 {
        candle_core::bail!("conv2d: input {xs:?} does not fit kernel {ws:?} at {cfg:?}");
    }
    let w_fits = w.dtype() == x.dtype() || kernels::is_bf16_weight(x, w);
    if !w_fits || bias.is_some_and(|b| b.dtype() != x.dtype()) {
        candle_core::bail!(
            "conv2d: input {:?}, kernel {:?} and bias {:?} differ in dtype",
            x.dtype(),
            w.dtype(),
            bias.map(Tensor::dtype)
        );
    }
    if let Some(b) = bias {
        if b.dims() != [ws[0]] {
            candle_core::bail!("conv2d: bias {:?} does not fit kernel {ws:?}", b.dims());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_rel as rel, randn, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Device, Var};

    fn cfg(stride: usize, padding: usize) -> ConvConfig {
        ConvConfig { stride, padding }
    }

    #[test]
    fn each_kernel_equals_candles_conv_forward_and_backward() {
        // (b, c, h, w, o, k, stride, padding)
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 4, 8, 8, 3, 1, 1, 0),
            (2, 3, 9, 9, 4, 3, 2, 1),
            (1, 2, 8, 8, 2, 3, 2, 1),
            (1, 3, 6, 6, 2, 3, 1, 0),
            (1, 2, 5, 5, 2, 3, 2, 0),
            (1, 2, 6, 6, 3, 3, 1, 2),
            (2, 3, 7, 7, 2, 1, 2, 0),
        ];
        for kernels in Kernels::ALL {
            for (b, c, h, w, o, k, s, p) in cases {
                for dtype in [DType::F32, DType::F64] {
                    let r = |shape: &[usize]| Var::from_tensor(&randn(shape, dtype)).unwrap();
                    let (x, kern) = (r(&[b, c, h, w]), r(&[o, c, k, k]));
                    let bias = randn(&[o], dtype);
                    let fast = kernels.scope(|| conv2d(&x, &kern, Some(&bias), cfg(s, p)).unwrap());
                    let slow = conv2d_slow(&x, &kern, Some(&bias), cfg(s, p)).unwrap();
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    let case = (kernels, (b, c, h, w, o, k, s, p));
                    assert_eq!(fast.dims(), slow.dims());
                    let e = rel(&fast, &slow);
                    assert!(e < tol, "{case:?} forward {e}");
                    let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                    for (name, v) in [("x", &x), ("w", &kern)] {
                        let e = rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                        assert!(e < tol * 10.0, "{case:?} d{name} {e}");
                    }
                }
            }
        }
    }

    /// Strided convs of inputs whose sides need different output paddings (candle's own conv
    /// backward cannot take them): the reference is the conv of the input padded with a zero
    /// column, whose output is the same, cropped back.
    #[test]
    fn strided_convs_of_uneven_inputs_have_the_right_input_gradient() {
        for kernels in Kernels::ALL {
            let x = Var::from_tensor(&randn(&[1, 2, 8, 7], DType::F32)).unwrap();
            let w = randn(&[3, 2, 3, 3], DType::F32);
            let m = randn(&[1, 3, 4, 4], DType::F32);
            let dx = kernels.scope(|| {
                let y = conv2d(&x, &w, None, cfg(2, 1)).unwrap();
                let g = (y * &m).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(&x).unwrap().clone()
            });
            let xp = Var::from_tensor(&x.as_tensor().pad_with_zeros(3, 0, 1).unwrap()).unwrap();
            let yp = xp.conv2d(&w, 1, 2, 1, 1).unwrap();
            let g = (yp * &m).unwrap().sum_all().unwrap().backward().unwrap();
            let dxp = g.get(&xp).unwrap().narrow(3, 0, 7).unwrap();
            assert!(rel(&dx, &dxp) < 1e-5, "{kernels}");
        }
    }

    /// A frozen bf16 kernel beside f32 input (the CPU's bf16 weights) acts as its f32 value,
    /// forward and in every gradient, on both kernels, plain and transformed (with the kernel
    /// smaller and larger than the columns); a tracked one is refused.
    #[test]
    fn a_bf16_kernel_beside_f32_input_acts_as_its_f32_value() {
        for kernels in Kernels::ALL {
            for (o, s) in [(4, 1), (40, 2)] {
                let x = Var::from_tensor(&randn(&[2, 3, 7, 7], DType::F32)).unwrap();
                let w16 = randn(&[o, 3, 3, 3], DType::F32)
                    .to_dtype(DType::BF16)
                    .unwrap();
                let w32 = w16.to_dtype(DType::F32).unwrap();
                let bias = randn(&[o], DType::F32);
                let t = Var::from_tensor(&randn(&[9, 9], DType::F32)).unwrap();
                let ft = FilterTransform::Matrix(t.as_tensor().clone());
                let run = |w: &Tensor| {
                    kernels.scope(|| {
                        let a = conv2d(&x, w, Some(&bias), cfg(s, 1)).unwrap();
                        let b = conv2d_transformed(&x, w, Some(&bias), &ft, cfg(s, 1)).unwrap();
                        let loss = (a.sqr().unwrap().sum_all().unwrap()
                            + b.sqr().unwrap().sum_all().unwrap())
                        .unwrap();
                        let g = loss.backward().unwrap();
                        [a, b, g.get(&x).unwrap().clone(), g.get(&t).unwrap().clone()]
                    })
                };
                let (got, want) = (run(&w16), run(&w32));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.dtype(), DType::F32);
                    let e = rel(g, w);
                    assert!(e < 1e-6, "{kernels} o {o}: output {i} differs by {e}");
                }
                let tracked = Var::from_tensor(&w16).unwrap();
                let err = conv2d(&x, &tracked, None, cfg(1, 1)).unwrap_err();
                assert!(err.to_string().contains("frozen"), "{err}");
            }
        }
    }

    #[test]
    fn frozen_kernels_get_no_gradient_work() {
        for kernels in Kernels::ALL {
            let x = Var::from_tensor(&randn(&[1, 2, 5, 5], DType::F32)).unwrap();
            let frozen = randn(&[3, 2, 3, 3], DType::F32);
            let g = kernels.scope(|| {
                let y = conv2d(&x, &frozen, None, cfg(1, 1)).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            });
            assert!(g.get(&x).is_some());
            assert!(g.get(&frozen).is_none());
        }
    }

    /// Forward and every gradient of [`conv2d_transformed`] equal the composed form,
    /// `conv2d(x, Wr T)`, for 3x3 and 1x1 kernels, strides 1 and 2, uneven inputs, one `T` or
    /// one per channel, and (fused) both forward paths (kernel transformed when it is the
    /// smaller, columns otherwise).
    #[test]
    fn the_transformed_conv_equals_the_conv_of_the_transformed_kernel() {
        // (b, c, h, w, o, k, stride, padding, grouped)
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1, false),
            (1, 4, 8, 8, 3, 1, 1, 0, false),
            (2, 3, 9, 9, 4, 3, 2, 1, false),
            (1, 3, 8, 7, 2, 3, 2, 1, false),
            (1, 3, 6, 6, 2, 3, 1, 0, true),
            (2, 4, 7, 5, 3, 3, 1, 1, true),
            (1, 4, 6, 6, 5, 1, 1, 0, true),
            // More output channels than output pixels: the column-transform path.
            (1, 3, 3, 3, 12, 3, 1, 1, false),
            (2, 3, 4, 3, 16, 3, 1, 1, true),
            (1, 4, 2, 2, 6, 1, 1, 0, true),
            (1, 3, 5, 5, 12, 3, 2, 1, false),
        ];
        for kernels in Kernels::ALL {
            for (b, c, h, w, o, k, s, p, grouped) in cases {
                for dtype in [DType::F32, DType::F64] {
                    let d = k * k;
                    let tshape = if grouped { vec![c, d, d] } else { vec![d, d] };
                    let x = Var::from_tensor(&randn(&[b, c, h, w], dtype)).unwrap();
                    let kern = Var::from_tensor(&randn(&[o, c, k, k], dtype)).unwrap();
                    let t = Var::from_tensor(&randn(&tshape, dtype)).unwrap();
                    let ft = FilterTransform::Matrix(t.as_tensor().clone());
                    let bias = randn(&[o], dtype);
                    let fast = kernels.scope(|| {
                        conv2d_transformed(&x, &kern, Some(&bias), &ft, cfg(s, p)).unwrap()
                    });
                    // The reference: the plain conv (held to candle's by the first test, and
                    // able to take strided convs of uneven inputs) of the kernel built by candle
                    // ops.
                    let wt = transformed_kernel(&kern, &t).unwrap();
                    let slow = kernels.scope(|| conv2d(&x, &wt, Some(&bias), cfg(s, p)).unwrap());
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    let case = (kernels, b, c, h, w, o, k, s, p, grouped, dtype);
                    assert_eq!(fast.dims(), slow.dims(), "{case:?}");
                    assert!(rel(&fast, &slow) < tol, "{case:?} forward");
                    let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                    for (name, v) in [("x", &x), ("w", &kern), ("t", &t)] {
                        let e = rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                        assert!(e < tol * 10.0, "{case:?} d{name}: {e}");
                    }
                }
            }
        }
    }

    /// The atoms form (`T` formed inside the op from `D0` and `dD`) equals the op given
    /// `T = I + scale D0^T dD` from candle ops: forward, `dL/dx` and `dL/d(dD)`, on both forward
    /// paths, at scales 1 and 0.5, with fewer atoms than the filter size too.
    #[test]
    fn the_atoms_form_equals_the_transform_it_stands_for() {
        // (b, c, h, w, o, k, stride, padding, m)
        let cases = [
            (2, 3, 7, 6, 4, 3, 1, 1, 9),
            (1, 3, 3, 3, 12, 3, 1, 1, 9),
            (1, 4, 5, 5, 3, 3, 2, 1, 5),
            (1, 4, 4, 4, 6, 1, 1, 0, 1),
        ];
        for kernels in Kernels::ALL {
            for (b, c, h, w, o, k, s, p, m) in cases {
                for dtype in [DType::F32, DType::F64] {
                    for scale in [1.0, 0.5] {
                        let d = k * k;
                        let x = Var::from_tensor(&randn(&[b, c, h, w], dtype)).unwrap();
                        let kern = randn(&[o, c, k, k], dtype);
                        let d0 = randn(&[m, d], dtype);
                        let dd = Var::from_tensor(&randn(&[m, d], dtype)).unwrap();
                        let atoms = FilterTransform::Atoms {
                            atoms: d0.clone(),
                            delta: dd.as_tensor().clone(),
                            scale,
                        };
                        let fast = kernels.scope(|| {
                            conv2d_transformed(&x, &kern, None, &atoms, cfg(s, p)).unwrap()
                        });
                        let t = atoms.matrix().unwrap();
                        let slow = conv2d_slow(
                            &x,
                            &transformed_kernel(&kern, &t).unwrap(),
                            None,
                            cfg(s, p),
                        )
                        .unwrap();
                        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                        let case = (kernels, b, c, h, w, o, k, s, p, m, dtype, scale);
                        assert!(rel(&fast, &slow) < tol, "{case:?} forward");
                        let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                        for (name, v) in [("x", &x), ("dD", &dd)] {
                            let e = rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                            assert!(e < tol * 10.0, "{case:?} d{name}: {e}");
                        }
                    }
                }
            }
        }
    }

    /// A half-precision model's adapted conv (what a GPU runs with f16 weights): `T` stays f32,
    /// `W'` is rounded once to the model's dtype, and `dL/d(dD)` comes back in f32 within that
    /// dtype's rounding of the f32 result. (bf16 has the same code path; candle's CPU has no
    /// bf16 conv to run it here, and bf16 models compute in f32 on the CPU.)
    #[test]
    fn a_half_precision_conv_keeps_its_f32_transform_and_gradient() {
        let (x32, w32) = (
            randn(&[2, 3, 6, 6], DType::F32),
            randn(&[4, 3, 3, 3], DType::F32),
        );
        let d0 = randn(&[9, 9], DType::F32);
        let dd = Var::from_tensor(&(randn(&[9, 9], DType::F32) * 0.1).unwrap()).unwrap();
        let atoms = FilterTransform::Atoms {
            atoms: d0,
            delta: dd.as_tensor().clone(),
            scale: 1.0,
        };
        let m = randn(&[2, 4, 6, 6], DType::F32);
        let grad_of = |y: Tensor| {
            let g = (y.to_dtype(DType::F32).unwrap() * &m)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(&dd).unwrap().clone()
        };
        let y32 = conv2d_transformed(&x32, &w32, None, &atoms, cfg(1, 1)).unwrap();
        let want = grad_of(y32.clone());
        let (dtype, tol) = (DType::F16, 5e-3);
        let (x, w) = (x32.to_dtype(dtype).unwrap(), w32.to_dtype(dtype).unwrap());
        let y = conv2d_transformed(&x, &w, None, &atoms, cfg(1, 1)).unwrap();
        assert_eq!(y.dtype(), dtype);
        let e = rel(&y.to_dtype(DType::F32).unwrap(), &y32);
        assert!(e < tol, "{dtype:?} forward {e}");
        let got = grad_of(y);
        assert_eq!(got.dtype(), DType::F32);
        let e = rel(&got, &want);
        assert!(e < tol, "{dtype:?} dD {e}");
    }

    /// Only what is tracked gets a gradient: an adapter's `T` without the frozen kernel, and no
    /// input gradient for the first conv's (untracked) input.
    #[test]
    fn only_tracked_inputs_get_gradients() {
        for kernels in Kernels::ALL {
            let x = randn(&[1, 2, 5, 5], DType::F32);
            let kern = randn(&[3, 2, 3, 3], DType::F32);
            let t = Var::from_tensor(&Tensor::eye(9, DType::F32, &Device::Cpu).unwrap()).unwrap();
            let ft = FilterTransform::Matrix(t.as_tensor().clone());
            let g = kernels.scope(|| {
                let y = conv2d_transformed(&x, &kern, None, &ft, cfg(1, 1)).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            });
            assert!(g.get(&t).is_some());
            assert!(g.get(&x).is_none());
            assert!(g.get(&kern).is_none());
        }
    }

    /// With `T = I` the transformed conv is the plain conv.
    #[test]
    fn the_identity_transform_is_the_plain_conv() {
        for kernels in Kernels::ALL {
            let x = randn(&[2, 3, 6, 6], DType::F64);
            let kern = randn(&[4, 3, 3, 3], DType::F64);
            let t = FilterTransform::Matrix(Tensor::eye(9, DType::F64, &Device::Cpu).unwrap());
            let (a, b) = kernels.scope(|| {
                (
                    conv2d_transformed(&x, &kern, None, &t, cfg(1, 1)).unwrap(),
                    conv2d(&x, &kern, None, cfg(1, 1)).unwrap(),
                )
            });
            assert!(rel(&a, &b) < 1e-14, "{kernels}");
        }
    }

    /// Wrong shapes are errors, not panics.
    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let x = randn(&[1, 3, 6, 6], DType::F32);
        let kern = randn(&[4, 3, 3, 3], DType::F32);
        let t = FilterTransform::Matrix(Tensor::eye(4, DType::F32, &Device::Cpu).unwrap());
        assert!(conv2d_transformed(&x, &kern, None, &t, cfg(1, 1)).is_err());
        assert!(conv2d(&x, &randn(&[4, 2, 3, 3], DType::F32), None, cfg(1, 1)).is_err());
        assert!(conv2d(&randn(&[1, 3, 2, 2], DType::F32), &kern, None, cfg(1, 0)).is_err());
    }
}
