//! Layer normalisation over the last axis as one op with its own backward.
//!
//! Composed from candle ops ([`layer_norm_slow`], candle-nn's `layer_norm_slow`, which unlike
//! its fused `layer_norm` has a backward), it is nine passes over the tokens forward, each kept
//! for the backward; the UNet's transformer blocks run three per block. Here the op keeps only
//! its input; the backward recomputes the row statistics and computes
//!
//! `dxhat = dy gamma`, `dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))` per row,
//!
//! and `dgamma = sum dy xhat`, `dbeta = sum dy` only when those are tracked: by the fused CPU
//! kernel (`fused.rs`, f32 and f64), or on every device (`portable.rs`) with candle's fused
//! `layer_norm` kernel forward (the one without a backward) and candle ops backward.

use candle_core::Tensor;

use crate::kernels;
use crate::Result;

mod fused;
mod portable;

/// `x [..., c]` normalised over its last axis, scaled by `gamma [c]` and shifted by `beta [c]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dims().last().copied().unwrap_or(0);
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "layer norm: input {:?} does not fit scale {:?} and shift {:?}",
            x.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    if kernels::fused(&[x, gamma, beta])? {
        fused::layer_norm(x, gamma, beta, eps)
    } else {
        portable::layer_norm(x, gamma, beta, eps)
    }
}

/// The same from candle ops that have a backward, and candle's autograd: the reference.
pub fn layer_norm_slow(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::ops::layer_norm_slow(x, gamma, beta, eps as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{check_half_precision, max_rel, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Device, Var};

    /// Forward and every gradient equal the composed candle ops (more rows than one task takes).
    #[test]
    fn each_kernel_equals_the_composed_norm() {
        for kernels in Kernels::ALL {
            for dtype in [DType::F32, DType::F64] {
                // widths below, at and past the 16 lanes of the f32 sums (37 = 2 x 16 + 5)
                for shape in [
                    vec![2, 70, 12],
                    vec![5, 8],
                    vec![1, 1, 3, 16],
                    vec![3, 5, 37],
                ] {
                    let r = |s: &[usize], mean: f32| {
                        Var::from_tensor(
                            &crate::test_support::normal(mean, 1.0, s)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap(),
                        )
                        .unwrap()
                    };
                    let c = *shape.last().unwrap();
                    let (x, g, b) = (r(&shape, 0.5), r(&[c], 1.0), r(&[c], 0.0));
                    let fast = kernels.scope(|| layer_norm(&x, &g, &b, 1e-5).unwrap());
                    let slow = layer_norm_slow(&x, &g, &b, 1e-5).unwrap();
                    // f64: the reference takes its epsilon as f32
                    let tol = if dtype == DType::F32 { 2e-5 } else { 1e-6 };
                    let case = (kernels, dtype, &shape);
                    assert!(max_rel(&fast, &slow) < tol, "{case:?} forward");
                    let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                    for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                        let e = max_rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                        assert!(e < tol * 10.0, "{case:?} d{name}: {e}");
                    }
                }
            }
        }
    }

    /// Half precision (the portable form, candle's fused kernel forward): within the dtype's
    /// rounding of f32.
    #[test]
    fn half_precision_norms_stay_close_to_f32() {
        let x = crate::test_support::normal(0.5f32, 2.0, (3, 7, 40)).unwrap();
        let g = crate::test_support::normal(1f32, 0.5, 40).unwrap();
        let b = crate::test_support::normal(0f32, 0.5, 40).unwrap();
        check_half_precision(
            &x,
            |x| layer_norm_slow(x, &g, &b, 1e-5).unwrap(),
            |x, dt| {
                let h = |t: &Tensor| t.to_dtype(dt).unwrap();
                layer_norm(x, &h(&g), &h(&b), 1e-5).unwrap()
            },
            &[(DType::F16, 4e-3), (DType::BF16, 3e-2)],
        );
    }

    #[test]
    fn frozen_scale_and_shift_get_no_gradient() {
        for kernels in Kernels::ALL {
            let x =
                Var::from_tensor(&crate::test_support::normal(0f32, 1.0, (3, 4)).unwrap()).unwrap();
            let g = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
            let grads = kernels.scope(|| {
                let y = layer_norm(&x, &g, &b, 1e-5).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            });
            assert!(grads.get(&x).is_some());
            assert!(grads.get(&g).is_none());
        }
    }
}
