//! Group normalisation, optionally followed by SiLU, as one op with its own backward.
//!
//! Composed from candle ops (as candle-nn's `GroupNorm`, [`group_norm_slow`]), a group norm is
//! about ten passes over the feature map forward, each keeping its result for the backward, and
//! as many again backward; the UNet's resnets follow each norm with a SiLU, two more. Here the
//! op keeps only its input, and the backward recomputes the statistics and computes
//!
//! `dz = dy silu'(z)`, `dxhat = dz gamma`,
//! `dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))` over each group,
//!
//! and `dgamma = sum dz xhat`, `dbeta = sum dz` only when those are tracked: by the fused CPU
//! kernel (`fused.rs`, f32 and f64) or from candle ops on every device (`portable.rs`,
//! statistics in f32 for half precision).

use candle_core::Tensor;

use crate::kernels;
use crate::Result;

mod fused;
mod portable;

/// Groups, epsilon, and whether SiLU follows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormConfig {
    /// Channel groups (the channels must split evenly).
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Whether `silu(norm(x))` is returned (the UNet's resnets), in the same op.
    pub silu: bool,
}

/// `x [b, c, ...]` normalised over groups of channels (and everything after the channel axis),
/// scaled by `gamma [c]`, shifted by `beta [c]`, then passed through SiLU when `cfg.silu`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNormConfig,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    if cfg.groups == 0 || c % cfg.groups != 0 {
        candle_core::bail!(
            "group norm: {c} channels do not split into {} groups",
            cfg.groups
        );
    }
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "group norm: scale {:?} and shift {:?} do not fit {c} channels",
            gamma.dims(),
            beta.dims()
        );
    }
    if kernels::fused(&[x, gamma, beta])? {
        fused::group_norm(x, gamma, beta, cfg)
    } else {
        portable::group_norm(x, gamma, beta, cfg)
    }
}

/// The same from candle-nn's `GroupNorm` and candle's autograd: the reference.
pub fn group_norm_slow(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNormConfig,
) -> Result<Tensor> {
    let norm =
        candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), x.dim(1)?, cfg.groups, cfg.eps)?;
    let y = candle_core::Module::forward(&norm, x)?;
    if cfg.silu {
        y.silu()
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{check_half_precision, max_rel, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Device, Var};

    fn cfg(groups: usize, silu: bool) -> GroupNormConfig {
        GroupNormConfig {
            groups,
            eps: 1e-5,
            silu,
        }
    }

    /// Forward and every gradient equal the composed candle ops, with and without SiLU.
    #[test]
    fn each_kernel_equals_the_composed_norm() {
        for kernels in Kernels::ALL {
            for dtype in [DType::F32, DType::F64] {
                for silu in [false, true] {
                    for (shape, groups) in [
                        (vec![2, 6, 5, 4], 3),
                        (vec![1, 8, 7], 2),
                        (vec![1, 4, 3, 3], 4),
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
                        let c = shape[1];
                        let (x, g, b) = (r(&shape, 0.5), r(&[c], 1.0), r(&[c], 0.0));
                        let fast =
                            kernels.scope(|| group_norm(&x, &g, &b, cfg(groups, silu)).unwrap());
                        let slow = group_norm_slow(&x, &g, &b, cfg(groups, silu)).unwrap();
                        let tol = if dtype == DType::F32 { 2e-5 } else { 1e-11 };
                        let case = (kernels, dtype, silu, &shape);
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
    }

    /// Half precision (the portable form): statistics in f32, within the dtype's rounding.
    #[test]
    fn half_precision_norms_stay_close_to_f32() {
        let x = crate::test_support::normal(0.5f32, 2.0, (2, 8, 4, 4)).unwrap();
        let g = crate::test_support::normal(1f32, 0.5, 8).unwrap();
        let b = crate::test_support::normal(0f32, 0.5, 8).unwrap();
        check_half_precision(
            &x,
            |x| group_norm_slow(x, &g, &b, cfg(4, true)).unwrap(),
            |x, dt| {
                let h = |t: &Tensor| t.to_dtype(dt).unwrap();
                group_norm(x, &h(&g), &h(&b), cfg(4, true)).unwrap()
            },
            &[(DType::F16, 4e-3), (DType::BF16, 3e-2)],
        );
    }

    /// Frozen gamma and beta (every norm of a model being tuned) get no gradient.
    #[test]
    fn frozen_scale_and_shift_get_no_gradient() {
        for kernels in Kernels::ALL {
            let x =
                Var::from_tensor(&crate::test_support::normal(0f32, 1.0, (1, 4, 3, 3)).unwrap())
                    .unwrap();
            let g = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
            let grads = kernels.scope(|| {
                let y = group_norm(&x, &g, &b, cfg(2, true)).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            });
            assert!(grads.get(&x).is_some());
            assert!(grads.get(&g).is_none());
        }
    }

    #[test]
    fn channels_that_do_not_split_into_groups_are_an_error() {
        let x = Tensor::zeros((1, 5, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        assert!(group_norm(&x, &g, &g, cfg(2, false)).is_err());
    }
}
