//! DDPM ancestral sampling (Ho et al., "Denoising Diffusion Probabilistic Models",
//! arXiv 2006.11239), as diffusers' `DDPMScheduler`. Stochastic: each step but the last adds
//! seeded noise.
//!
//! `x_prev = c0 x0 + ct x_t + sigma z` with `c0 = sqrt(abar_prev) beta_t / (1 - abar_t)`,
//! `ct = sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t)` and `sigma^2` the posterior variance.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{spaced_timesteps, NoiseSchedule};
use super::config::{Prediction, SchedulerConfig};
use super::{split_prediction, Scheduler};
use crate::rng::NoiseRng;
use crate::Result;

/// The step noise's variance: the posterior's (`fixed_small`, and `fixed_small_log`, which
/// diffusers computes as `exp(log(var) / 2)`, the same standard deviation) or `beta_t`.
#[derive(Clone, Copy)]
enum Variance {
    Small,
    Large,
}

/// The DDPM scheduler after `set_timesteps`.
pub struct Ddpm {
    schedule: NoiseSchedule,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    clip: Option<f64>,
    variance: Variance,
}

impl Ddpm {
    /// Builds it from a config (DDPM's defaults for absent keys) for `n` steps.
    pub fn new(c: &SchedulerConfig, n: usize) -> Result<Self> {
        c.only("thresholding", &[Value::Bool(false)])?;
        let variance = match c.str_or("variance_type", "fixed_small")?.as_str() {
            "fixed_small" | "fixed_small_log" => Variance::Small,
            "fixed_large" => Variance::Large,
            other => return Err(c.err(format!("`variance_type` = {other:?} is not supported (fixed_small, fixed_small_log, fixed_large)"))),
        };
        let schedule = NoiseSchedule::from_config(c)?;
        let ts = spaced_timesteps(
            c.spacing("leading")?,
            schedule.len(),
            n,
            c.usize_or("steps_offset", 0)?,
        );
        Ok(Ddpm {
            timesteps: ts.iter().map(|&x| x as f64).collect(),
            ts,
            prediction: c.prediction(&[
                Prediction::Epsilon,
                Prediction::VPrediction,
                Prediction::Sample,
            ])?,
            clip: if c.bool_or("clip_sample", true)? {
                Some(c.f64_or("clip_sample_range", 1.0)?)
            } else {
                None
            },
            variance,
            schedule,
        })
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, rng: &mut NoiseRng) -> Result<Tensor> {
        let t = self.ts[i];
        let prev = self.ts.get(i + 1).copied().unwrap_or(-1);
        let abar = self.schedule.alpha_bar(t, 1.0) as f64;
        let abar_prev = self.schedule.alpha_bar(prev, 1.0) as f64;
        let alpha = abar / abar_prev;
        let beta = 1.0 - alpha;
        let (mut x0, _) = split_prediction(self.prediction, out, x, abar)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let c0 = abar_prev.sqrt() * beta / (1.0 - abar);
        let ct = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar);
        let mean = ((x0 * c0)? + (x * ct)?)?;
        if t == 0 {
            return Ok(mean);
        }
        let var = ((1.0 - abar_prev) / (1.0 - abar) * beta).max(1e-20);
        let std = match self.variance {
            Variance::Small => var.sqrt(),
            Variance::Large => beta.sqrt(),
        };
        let z = rng.randn(x.dims(), x.dtype(), x.device())?;
        Ok((mean + (z * std)?)?)
    }
}
