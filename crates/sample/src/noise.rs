//! Forward diffusion for training: `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, and the
//! targets a model is trained to predict (DESIGN.md section 2).

use candle_core::Tensor;

use crate::schedulers::{NoiseSchedule, Prediction};
use crate::{Error, Result};

/// Per-example `[b, 1, 1, 1]` factors of `f(abar_t)` for timesteps `t`.
fn factors(
    s: &NoiseSchedule,
    t: &[usize],
    like: &Tensor,
    f: impl Fn(f64) -> f64,
) -> Result<Tensor> {
    if let Some(&bad) = t.iter().find(|&&t| t >= s.len()) {
        return Err(Error::Request(format!(
            "timestep {bad} is outside the schedule's {} steps",
            s.len()
        )));
    }
    let v: Vec<f32> = t
        .iter()
        .map(|&t| f(s.alphas_cumprod[t] as f64) as f32)
        .collect();
    let mut shape = vec![t.len()];
    shape.resize(like.rank(), 1);
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

/// `x_t` from clean samples `x0 [b, ...]`, noise `eps` and one timestep per example.
pub fn add_noise(s: &NoiseSchedule, x0: &Tensor, eps: &Tensor, t: &[usize]) -> Result<Tensor> {
    let a = factors(s, t, x0, |ab| ab.sqrt())?;
    let b = factors(s, t, x0, |ab| (1.0 - ab).sqrt())?;
    Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&b)?)?)
}

/// What the model should output: the noise (epsilon), `v = sqrt(abar) eps - sqrt(1 - abar) x0`,
/// or the sample.
pub fn target(
    s: &NoiseSchedule,
    p: Prediction,
    x0: &Tensor,
    eps: &Tensor,
    t: &[usize],
) -> Result<Tensor> {
    Ok(match p {
        Prediction::Epsilon => eps.clone(),
        Prediction::Sample => x0.clone(),
        Prediction::VPrediction => {
            let a = factors(s, t, x0, |ab| ab.sqrt())?;
            let b = factors(s, t, x0, |ab| (1.0 - ab).sqrt())?;
            (eps.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?
        }
    })
}
