//! The portable GEGLU: candle ops on every device, the backward in f32 (f64 for f64).

use candle_core::{Tensor, D};

use crate::handoff::{self, Backward};
use crate::kernels::wide;
use crate::Result;

pub(super) fn geglu(x: &Tensor) -> Result<Tensor> {
    let y = super::geglu_slow(&x.detach())?;
    handoff::attach(y, &[x], GegluGrad)
}

struct GegluGrad;

impl Backward for GegluGrad {
    fn name(&self) -> &'static str {
        "atomtune-geglu-portable"
    }

    fn backward(
        &self,
        inputs: &[&Tensor],
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let &[x] = inputs else {
            candle_core::bail!("{}: one input expected", self.name());
        };
        if !x.track_op() {
            return Ok(vec![None]);
        }
        let xw = x.detach().to_dtype(wide(x.dtype()))?;
        let dy = dy.detach().to_dtype(xw.dtype())?;
        let n = xw.dim(D::Minus1)? / 2;
        let (h, g) = (xw.narrow(D::Minus1, 0, n)?, xw.narrow(D::Minus1, n, n)?);
        // Phi(g) = (1 + erf(g / sqrt 2)) / 2, phi(g) = e^(-g^2 / 2) / sqrt(2 pi)
        let cdf = (((&g * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((g.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let dh = (&dy * (&g * &cdf)?)?;
        let dg = ((dy * h)? * (cdf + (g * pdf)?)?)?;
        let dx = Tensor::cat(&[dh, dg], D::Minus1)?.to_dtype(x.dtype())?;
        Ok(vec![Some(dx)])
    }
}
