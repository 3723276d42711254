//! The fused CPU linear layer: one gemm that reads `W` transposed in place, forward, and in the
//! backward `dy W` for a tracked input and `dy^T x` for a tracked weight, each one gemm that
//! reads its operands in place (so a bf16 weight reaches the bf16 kernel unwidened by candle,
//! and no transposed copy is made).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::dims;
use crate::cpu::matmul::{dense, Data, Mat};
use crate::cpu::{float_op, slices, weights, Float};
use crate::weight_cache::{Kept, Use};
use crate::Result;

/// The fused op on contiguous inputs of one dtype (f32 or f64), with a frozen bias added in the
/// kernel; `kept`: where the bf16 products keep a frozen weight's panels.
pub(super) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    kept: Option<Kept>,
) -> Result<Tensor> {
    let op = Linear {
        bias: bias.map(Tensor::detach),
        kept,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

struct Linear {
    /// A frozen bias `[dout]`: the output starts from it and the gemm accumulates.
    bias: Option<Tensor>,
    /// The weight's kept panels, for the forward and the input gradient.
    kept: Option<Kept>,
}

fn forward<T: Float>(
    x: &[T],
    w: Data<'_, T>,
    bias: Option<&[T]>,
    (m, k, n): (usize, usize, usize),
    kept: Option<&Kept>,
) -> Vec<T> {
    let y = match bias {
        Some(b) => b.repeat(m),
        None => vec![T::zero(); m * n],
    };
    let mut y = y;
    let (accumulate, w_t) = (bias.is_some(), Mat::new(w, n, k).t());
    if !Kept::product(kept, Use::LinearForward, (&mut y, x), w_t, (m, accumulate)) {
        // SAFETY: x is [m, k], w is [n, k] read transposed, y is [m, n].
        unsafe { dense(&mut y, x, w, (m, n, k), false, true, accumulate) };
    }
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
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let mkn = dims(l1.dims(), l2.dims())?;
        let y = float_op!(s1.dtype(), "atomtune-linear", |F| {
            let bias = self.bias.as_ref().map(|b| b.to_vec1::<F>()).transpose()?;
            forward(
                slices::<F>(s1, l1)?,
                weights::<F>(s2, l2)?,
                bias.as_deref(),
                mkn,
                self.kept.as_ref(),
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
        let _time = crate::op_times::start(|| format!("{} backward", self.name()));
        let dy = dy.detach().contiguous()?;
        let dx = x
            .track_op()
            .then(|| {
                w.detach()
                    .apply_op2_no_bwd(&dy, &Grad::Input(self.kept.clone()))?
                    .reshape(x.dims())
            })
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| {
                x.detach()
                    .contiguous()?
                    .apply_op2_no_bwd(&dy, &Grad::Weight)
            })
            .transpose()?;
        Ok((dx, dw))
    }
}

/// A gradient of the layer as an op on `(w, dy)` (`dx = dy W`, `[m, din]`, with the weight's
/// kept panels) or `(x, dy)` (`dW = dy^T x`, `[dout, din]`).
enum Grad {
    Input(Option<Kept>),
    Weight,
}

/// `dy b` (`[m, n]` from `dy [m, k]`, `b [k, n]`) or, when `dy_t`, `dy^T b` (`dy [k, m]`).
fn gradient<T: Float>(
    dy: &[T],
    b: Data<'_, T>,
    (m, n, k): (usize, usize, usize),
    dy_t: bool,
) -> Vec<T> {
    let mut g = vec![T::zero(); m * n];
    // SAFETY: the shapes are the op's: dy and b hold the matrices, g holds m x n.
    unsafe { dense(&mut g, dy, b, (m, n, k), dy_t, false, false) };
    g
}

/// `dx [m, din] = dy [m, dout] W [dout, din]`, on the weight's kept panels where they serve.
fn input_grad<T: Float>(
    dy: &[T],
    w: Data<'_, T>,
    (m, din, dout): (usize, usize, usize),
    kept: Option<&Kept>,
) -> Vec<T> {
    let mut dx = vec![T::zero(); m * din];
    let b = Mat::new(w, dout, din);
    if Kept::product(kept, Use::LinearInputGrad, (&mut dx, dy), b, (m, false)) {
        return dx;
    }
    // SAFETY: dy is [m, dout], w [dout, din], dx [m, din].
    unsafe { dense(&mut dx, dy, w, (m, din, dout), false, false, false) };
    dx
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        match self {
            Grad::Input(_) => "atomtune-linear-input-grad",
            Grad::Weight => "atomtune-linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
        let dout = *l2.dims().last().expect("dy has the output's rank");
        let m = l2.shape().elem_count() / dout.max(1);
        let din = match self {
            Grad::Input(_) => l1.dims()[1],
            Grad::Weight => *l1.dims().last().expect("x has a rank"),
        };
        // the gradient's dtype is dy's: the weight may be a bf16 weight beside f32 activations
        let g = float_op!(s2.dtype(), "atomtune-linear backward", |F| {
            let dy = slices::<F>(s2, l2)?;
            match self {
                Grad::Input(kept) => {
                    input_grad(dy, weights::<F>(s1, l1)?, (m, din, dout), kept.as_ref())
                }
                Grad::Weight => {
                    gradient(dy, Data::Plain(slices::<F>(s1, l1)?), (dout, din, m), true)
                }
            }
        });
        let shape = match self {
            Grad::Input(_) => Shape::from((m, din)),
            Grad::Weight => Shape::from((dout, din)),
        };
        Ok((g, shape))
    }
}
