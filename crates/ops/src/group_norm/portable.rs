//! The portable group norm: candle ops on every device, statistics in f32 (f64 for f64 inputs).

use candle_core::Tensor;

use super::GroupNormConfig;
use crate::handoff::{self, Backward};
use crate::kernels::wide;
use crate::Result;

pub(super) fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNormConfig,
) -> Result<Tensor> {
    let n = Normalized::of(&x.detach(), cfg)?;
    let y = n.z(&gamma.detach(), &beta.detach())?;
    let y = if cfg.silu { y.silu()? } else { y };
    let y = y.to_dtype(x.dtype())?.reshape(x.dims())?;
    handoff::attach(y, &[x, gamma, beta], GroupNormGrad { cfg })
}

/// `x` normalised per group, `xhat [b, c, rest]`, with each group's `1 / sqrt(var + eps)`
/// (`[b, groups, 1]`), in the wide dtype.
struct Normalized {
    xhat: Tensor,
    rstd: Tensor,
    groups: usize,
}

impl Normalized {
    fn of(x: &Tensor, cfg: GroupNormConfig) -> Result<Self> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let rest = x.elem_count() / (b * c).max(1);
        let xg = x
            .to_dtype(wide(x.dtype()))?
            .reshape((b, cfg.groups, (c / cfg.groups) * rest))?;
        let centred = xg.broadcast_sub(&xg.mean_keepdim(2)?)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let rstd = (var + cfg.eps)?.sqrt()?.recip()?;
        Ok(Normalized {
            xhat: centred.broadcast_mul(&rstd)?.reshape((b, c, rest))?,
            rstd,
            groups: cfg.groups,
        })
    }

    /// A per-channel vector as `[1, c, 1]` in the wide dtype.
    fn channel(&self, t: &Tensor) -> Result<Tensor> {
        t.to_dtype(self.xhat.dtype())?
            .reshape((1, t.elem_count(), 1))
    }

    /// `z = xhat gamma + beta`, `[b, c, rest]`.
    fn z(&self, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        self.xhat
            .broadcast_mul(&self.channel(gamma)?)?
            .broadcast_add(&self.channel(beta)?)
    }

    /// `[b, c, rest]` seen by group, `[b, groups, c / groups * rest]`.
    fn by_group(&self, t: &Tensor) -> Result<Tensor> {
        let (b, _, _) = t.dims3()?;
        t.reshape((b, self.groups, ()))
    }
}

struct GroupNormGrad {
    cfg: GroupNormConfig,
}

impl Backward for GroupNormGrad {
    fn name(&self) -> &'static str {
        "atomtune-group-norm-portable"
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
        let n = Normalized::of(&x.detach(), self.cfg)?;
        let wide_dt = n.xhat.dtype();
        let dy = dy.detach().to_dtype(wide_dt)?.reshape(n.xhat.shape())?;
        let dz = if self.cfg.silu {
            // d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
            let z = n.z(&gamma.detach(), &beta.detach())?;
            let s = candle_nn::ops::sigmoid(&z)?;
            let ds = ((z * (1.0 - &s)?)? + 1.0)?;
            (dy * s)?.mul(&ds)?
        } else {
            dy
        };
        let per_channel = |t: Tensor, like: &Tensor| -> Result<Tensor> {
            t.sum(2)?.sum(0)?.to_dtype(like.dtype())
        };
        let dgamma = gamma
            .track_op()
            .then(|| per_channel((&dz * &n.xhat)?, gamma))
            .transpose()?;
        let dbeta = beta
            .track_op()
            .then(|| per_channel(dz.clone(), beta))
            .transpose()?;
        let dx = if x.track_op() {
            let dxhat = n.by_group(&dz.broadcast_mul(&n.channel(&gamma.detach())?)?)?;
            let xhat = n.by_group(&n.xhat)?;
            let m1 = dxhat.mean_keepdim(2)?;
            let m2 = (&dxhat * &xhat)?.mean_keepdim(2)?;
            let dx = dxhat
                .broadcast_sub(&m1)?
                .sub(&xhat.broadcast_mul(&m2)?)?
                .broadcast_mul(&n.rstd)?;
            Some(dx.reshape(x.dims())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        Ok(vec![dx, dgamma, dbeta])
    }
}
