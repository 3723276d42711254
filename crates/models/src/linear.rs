//! `y = x W^T` as one op whose backward computes only the gradients someone needs.
//!
//! candle's matmul backward computes both operands' gradients, always: for a frozen weight that
//! is a gemm the size of the forward whose result is thrown away, and the result stays in the
//! gradient store until the backward ends (every linear weight of SD 1.5's UNet, a gigabyte).
//! Here the input gradient `dy W` is computed when the input is tracked and the weight gradient
//! `dy^T x` when the weight is (LoRA's or a full adapter's effective weight).
//!
//! The CPU runs f32 and f64 with one gemm that reads `W` transposed in place; other devices and
//! dtypes use candle's `broadcast_matmul`, which is also the reference the tests hold this op
//! to.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::conv::float_op;
use crate::Result;

/// `x [..., din] @ w^T` for `w [dout, din]`: `[..., dout]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && w.rank() == 2;
    if !fast {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?)
}

struct Linear;

/// `(rows, din, dout)` of `x [..., din]` times `w [dout, din]`.
fn dims(x: &[usize], w: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    let (Some(&din), &[dout, din2]) = (x.last(), w) else {
        candle_core::bail!("linear expects [..., din] and [dout, din], got {x:?} and {w:?}");
    };
    if din != din2 {
        candle_core::bail!("linear: input {x:?} does not fit weight {w:?}");
    }
    Ok((x.iter().product::<usize>() / din.max(1), din, dout))
}

fn forward<T: crate::conv::Float>(x: &[T], w: &[T], (m, k, n): (usize, usize, usize)) -> Vec<T> {
    let mut y = vec![T::zero(); m * n];
    // SAFETY: x is [m, k], w is [n, k] read transposed, y is [m, n].
    unsafe { crate::conv::gemm(&mut y, x, w, (m, n, k), false, true, false) };
    y
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "atomtune-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mkn = dims(l1.dims(), l2.dims())?;
        let y = float_op!(s1.dtype(), "atomtune-linear", |F| forward(
            crate::conv::slices::<F>(s1, l1)?,
            crate::conv::slices::<F>(s2, l2)?,
            mkn,
        ));
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("rank checked") = mkn.2;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, din, dout) = dims(x.dims(), w.dims())?;
        let dy = dy.detach().reshape((m, dout))?;
        let dx = if x.track_op() {
            Some(dy.matmul(&w.detach())?.reshape(x.dims())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(dy.t()?.matmul(&x.detach().reshape((m, din))?)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn the_op_equals_candles_matmul_forward_and_backward() {
        for dtype in [DType::F32, DType::F64] {
            for shape in [vec![2, 5, 7], vec![3, 7], vec![1, 1, 4, 7]] {
                let r = |s: &[usize]| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 1.0, s, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, w) = (r(&shape), r(&[6, 7]));
                let fast = linear(&x, &w).unwrap();
                let slow = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert_eq!(fast.dims(), slow.dims());
                let scale = max_abs(&slow);
                assert!(max_abs(&(&fast - &slow).unwrap()) < tol * scale);
                let (gf, gs) = weighted_grads(&fast, &slow);
                for (name, v) in [("x", &x), ("w", &w)] {
                    let (a, b) = (gf.get(v).unwrap(), gs.get(v).unwrap());
                    let e = max_abs(&(a - b).unwrap()) / max_abs(b);
                    assert!(e < tol * 10.0, "{shape:?} {dtype:?} d{name}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 3), &Device::Cpu).unwrap();
        let g = linear(&x, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&w).is_none());
    }
}
