//! The fused CPU linear layer: one gemm that reads `W` transposed in place, forward, and in the
//! backward `dy W` for a tracked input and `dy^T x` for a tracked weight.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::dims;
use crate::cpu::matmul::dense;
use crate::cpu::{float_op, slices, weights, Float};
use crate::Result;

/// The fused op on contiguous inputs of one dtype (f32 or f64), with a frozen bias added in the
/// kernel.
pub(super) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = Linear {
        bias: bias.map(Tensor::detach),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

struct Linear {
    /// A frozen bias `[dout]`: the output starts from it and the gemm accumulates.
    bias: Option<Tensor>,
}

fn forward<T: Float>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<T> {
    let y = match bias {
        Some(b) => b.repeat(m),
        None => vec![T::zero(); m * n],
    };
    let mut y = y;
    // SAFETY: x is [m, k], w is [n, k] read transposed, y is [m, n].
    unsafe { dense(&mut y, x, w, (m, n, k), false, true, bias.is_some()) };
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
        let y = float_op!(s1.dtype(), "atomtune-linear", |F| {
            let bias = self.bias.as_ref().map(|b| b.to_vec1::<F>()).transpose()?;
            forward(
                slices::<F>(s1, l1)?,
                &weights::<F>(s2, l2)?,
                bias.as_deref(),
                mkn,
            )
        });
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
        super::grads(x, w, dy)
    }
}
