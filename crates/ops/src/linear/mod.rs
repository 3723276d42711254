//! `y = x W^T` as one op whose backward computes only the gradients someone needs.
//!
//! candle's matmul backward computes both operands' gradients, always: for a frozen weight that
//! is a gemm the size of the forward whose result is thrown away, and the result stays in the
//! gradient store until the backward ends (every linear weight of SD 1.5's UNet, a gigabyte).
//! Here the input gradient `dy W` is computed when the input is tracked and the weight gradient
//! `dy^T x` when the weight is (LoRA's or a full adapter's effective weight). The fused CPU
//! kernel (`fused.rs`) runs f32 and f64 with one gemm; the portable form (`portable.rs`) is
//! candle's matmul on every device. [`linear_slow`] is the reference the tests hold both to.

use candle_core::Tensor;

use crate::kernels;
use crate::weight_cache::WeightCache;
use crate::Result;

mod fused;
mod portable;

/// `x [..., din] @ w^T (+ bias)` for `w [dout, din]` and `bias [dout]`: `[..., dout]`.
///
/// A frozen bias (not tracked: every bias of a model being tuned) is added inside the op, so that
/// the graph keeps the layer's input only, not its output twice (before and after the bias); a
/// tracked one is added by candle, so that its gradient flows.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_cached(x, w, bias, None)
}

/// [`linear`] for a layer that keeps its frozen weight's packed operands in `cache` between
/// training steps ([`crate::weight_cache`]), where the bf16 products run it; the same numbers as
/// [`linear`].
pub fn linear_cached(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cache: Option<&WeightCache>,
) -> Result<Tensor> {
    let (_, _, dout) = dims(x.dims(), w.dims())?;
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if !(same(w) || kernels::is_bf16_weight(x, w)) || bias.is_some_and(|b| !same(b)) {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} differ in dtype",
            x.dtype(),
            w.dtype(),
            bias.map(Tensor::dtype)
        );
    }
    if let Some(b) = bias {
        if b.dims() != [dout] {
            candle_core::bail!(
                "linear: bias {:?} does not fit weight {:?}",
                b.dims(),
                w.dims()
            );
        }
    }
    let (frozen, tracked) = kernels::split_bias(bias);
    let kept = cache.and_then(|c| c.for_weight(w, x.track_op()));
    let (w, fused) = kernels::weight_and_path(x, w, &[])?;
    let y = if fused {
        fused::linear(x, &w, frozen, kept)?
    } else {
        portable::linear(x, &w, frozen)?
    };
    match tracked {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The same from candle's matmul and autograd: the reference.
pub fn linear_slow(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `(rows, din, dout)` of `x [..., din]` times `w [dout, din]`.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (Some(&din), &[dout, din2]) = (x.last(), w) else {
        candle_core::bail!("linear expects [..., din] and [dout, din], got {x:?} and {w:?}");
    };
    if din != din2 {
        candle_core::bail!("linear: input {x:?} does not fit weight {w:?}");
    }
    Ok((x.iter().product::<usize>() / din.max(1), din, dout))
}

/// The backward of both forms: `dx = dy W` when `x` is tracked, `dW = dy^T x` when `w` is.
fn grads(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (m, din, dout) = dims(x.dims(), w.dims())?;
    let dy = dy.detach().to_dtype(x.dtype())?.reshape((m, dout))?;
    let dx = x
        .track_op()
        .then(|| {
            dy.matmul(&w.detach().to_dtype(x.dtype())?)?
                .reshape(x.dims())
        })
        .transpose()?;
    let dw = w
        .track_op()
        .then(|| dy.t()?.matmul(&x.detach().reshape((m, din))?))
        .transpose()?;
    Ok((dx, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_rel, randn, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Var};

    /// A frozen bf16 weight beside f32 input acts as its f32 value, forward and backward, on
    /// both kernels; a tracked one is refused.
    #[test]
    fn a_bf16_weight_beside_f32_input_acts_as_its_f32_value() {
        for kernels in Kernels::ALL {
            let x = Var::from_tensor(&randn(&[3, 5, 7], DType::F32)).unwrap();
            let w16 = randn(&[6, 7], DType::F32).to_dtype(DType::BF16).unwrap();
            let w32 = w16.to_dtype(DType::F32).unwrap();
            let b = randn(&[6], DType::F32);
            let run = |w: &Tensor| {
                kernels.scope(|| {
                    let y = linear(&x, w, Some(&b)).unwrap();
                    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    [y, g.get(&x).unwrap().clone()]
                })
            };
            let (got, want) = (run(&w16), run(&w32));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let e = max_rel(g, w);
                assert!(e < 1e-6, "{kernels}: output {i} differs by {e}");
            }
            let tracked = Var::from_tensor(&w16).unwrap();
            let err = linear(&x, &tracked, None).unwrap_err();
            assert!(err.to_string().contains("frozen"), "{err}");
        }
    }

    #[test]
    fn each_kernel_equals_candles_matmul_forward_and_backward() {
        for kernels in Kernels::ALL {
            for dtype in [DType::F32, DType::F64] {
                for shape in [vec![2, 5, 7], vec![3, 7], vec![1, 1, 4, 7]] {
                    let r = |s: &[usize]| Var::from_tensor(&randn(s, dtype)).unwrap();
                    let (x, w) = (r(&shape), r(&[6, 7]));
                    let b = randn(&[6], dtype);
                    let fast = kernels.scope(|| linear(&x, &w, Some(&b)).unwrap());
                    let slow = linear_slow(&x, &w, Some(&b)).unwrap();
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert_eq!(fast.dims(), slow.dims());
                    assert!(max_rel(&fast, &slow) < tol);
                    let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                    for (name, v) in [("x", &x), ("w", &w)] {
                        let e = max_rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                        assert!(e < tol * 10.0, "{kernels} {shape:?} {dtype:?} d{name}: {e}");
                    }
                }
            }
        }
    }

    /// A frozen bias is added inside the op: the output's graph node is the op itself (no
    /// separate addition keeping the output twice); a tracked bias gets its gradient.
    #[test]
    fn a_frozen_bias_is_added_inside_the_op_and_a_tracked_one_gets_a_gradient() {
        for kernels in Kernels::ALL {
            let x = Var::from_tensor(&randn(&[2, 3], DType::F32)).unwrap();
            let w = randn(&[4, 3], DType::F32);
            let b = randn(&[4], DType::F32);
            let y = kernels.scope(|| linear(&x, &w, Some(&b)).unwrap());
            assert_eq!(y.sorted_nodes().len(), 2, "{kernels}: the op and its input");
            let bv = Var::from_tensor(&b).unwrap();
            let g = kernels.scope(|| {
                let y = linear(&x, &w, Some(&bv)).unwrap();
                (y * 2.0).unwrap().sum_all().unwrap().backward().unwrap()
            });
            let db = g.get(&bv).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(db, [4.0; 4], "{kernels}");
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        for kernels in Kernels::ALL {
            let x = Var::from_tensor(&randn(&[2, 3], DType::F32)).unwrap();
            let w = randn(&[4, 3], DType::F32);
            let g = kernels.scope(|| linear(&x, &w, None).unwrap().sum_all().unwrap().backward());
            let g = g.unwrap();
            assert!(g.get(&x).is_some());
            assert!(g.get(&w).is_none());
        }
    }

    #[test]
    fn half_precision_runs_the_portable_form() {
        let (x, w) = (randn(&[3, 8], DType::F32), randn(&[5, 8], DType::F32));
        let b = randn(&[5], DType::F32);
        let want = linear_slow(&x, &w, Some(&b)).unwrap();
        let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let got = linear(&h(&x), &h(&w), Some(&h(&b))).unwrap();
        assert_eq!(got.dtype(), DType::F16);
        assert!(max_rel(&got.to_dtype(DType::F32).unwrap(), &want) < 2e-3);
    }
}
