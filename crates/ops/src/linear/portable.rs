//! The portable linear layer: candle's matmul (cuBLAS on CUDA) on the rows of `x`, and the
//! shared backward.

use candle_core::Tensor;

use super::{dims, grads};
use crate::handoff::{self, Backward};
use crate::Result;

/// The layer with a frozen bias added inside the op.
pub(super) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, din, dout) = dims(x.dims(), w.dims())?;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("dims checked the rank") = dout;
    let y = x.detach().reshape((m, din))?.matmul(&w.detach().t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    handoff::attach(y.reshape(shape)?, &[x, w], LinearGrad)
}

struct LinearGrad;

impl Backward for LinearGrad {
    fn name(&self) -> &'static str {
        "atomtune-linear-portable"
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
        let (dx, dw) = grads(x, w, dy)?;
        Ok(vec![dx, dw])
    }
}
