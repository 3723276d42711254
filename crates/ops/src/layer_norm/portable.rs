//! The portable layer norm: candle's fused `layer_norm` kernel forward (it has no backward of
//! its own, and needs none here), candle ops backward with statistics in f32 (f64 for f64).

use candle_core::{DType, Tensor, D};

use crate::handoff::{self, Backward};
use crate::kernels::wide;
use crate::Result;

pub(super) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (xd, gd, bd) = (
        x.detach().contiguous()?,
        gamma.detach().to_dtype(x.dtype())?,
        beta.detach().to_dtype(x.dtype())?,
    );
    let y = if x.dtype() == DType::F64 {
        // candle's kernel computes in f32; f64 (a CPU test dtype, never a GPU's) keeps its
        // precision through the composed form
        let (xhat, _) = normalized(&xd, eps)?;
        xhat.broadcast_mul(&gd)?.broadcast_add(&bd)?
    } else {
        candle_nn::ops::layer_norm(&xd, &gd, &bd, eps as f32)?
    };
    handoff::attach(y, &[x, gamma, beta], LayerNormGrad { eps })
}

/// `xhat` and the rows' `1 / sqrt(var + eps)` (`[..., 1]`), in the wide dtype.
fn normalized(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(wide(x.dtype()))?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((centred.broadcast_mul(&rstd)?, rstd))
}

struct LayerNormGrad {
    eps: f64,
}

impl Backward for LayerNormGrad {
    fn name(&self) -> &'static str {
        "atomtune-layer-norm-portable"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let &[x, gamma, beta] = inputs else {
            candle_core::bail!("{}: three inputs expected", self.name());
        };
        let (xhat, rstd) = normalized(&x.detach(), self.eps)?;
        let dy = dy.detach().to_dtype(xhat.dtype())?;
        let c = xhat.dim(D::Minus1)?;
        let rows = |t: Tensor| t.reshape(((), c));
        let dgamma = gamma
            .track_op()
            .then(|| rows((&dy * &xhat)?)?.sum(0)?.to_dtype(gamma.dtype()))
            .transpose()?;
        let dbeta = beta
            .track_op()
            .then(|| rows(dy.clone())?.sum(0)?.to_dtype(beta.dtype()))
            .transpose()?;
        let dx = if x.track_op() {
            let dxhat = dy.broadcast_mul(&gamma.detach().to_dtype(xhat.dtype())?)?;
            let m1 = dxhat.mean_keepdim(D::Minus1)?;
            let m2 = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
            let dx = dxhat
                .broadcast_sub(&m1)?
                .sub(&xhat.broadcast_mul(&m2)?)?
                .broadcast_mul(&rstd)?;
            Some(dx.to_dtype(x.dtype())?)
        } else {
            None
        };
        Ok(vec![dx, dgamma, dbeta])
    }
}
