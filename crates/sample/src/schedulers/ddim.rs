//! DDIM (Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502), deterministic
//! (`eta = 0`), as diffusers' `DDIMScheduler`.
//!
//! Notation of `step`: `x_t` the sample, `eps` the predicted noise, `x0` the predicted clean
//! sample, `abar_t` / `abar_prev` the cumulative alphas at this and the previous timestep:
//! `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps`.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{spaced_timesteps, NoiseSchedule};
use super::config::{Prediction, SchedulerConfig};
use super::{split_prediction, Scheduler};
use crate::rng::NoiseRng;
use crate::Result;

/// The DDIM scheduler after `set_timesteps`.
pub struct Ddim {
    schedule: NoiseSchedule,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    stride: i64,
    final_alpha: f32,
    prediction: Prediction,
    clip: Option<f64>,
}

impl Ddim {
    /// Builds it from a config (DDIM's defaults for absent keys) for `n` steps.
    pub fn new(c: &SchedulerConfig, n: usize) -> Result<Self> {
        c.only("thresholding", &[Value::Bool(false)])?;
        let schedule = NoiseSchedule::from_config(c)?;
        let t = schedule.len();
        let ts = spaced_timesteps(c.spacing("leading")?, t, n, c.usize_or("steps_offset", 0)?);
        let final_alpha = if c.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip = if c.bool_or("clip_sample", true)? {
            Some(c.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        Ok(Ddim {
            timesteps: ts.iter().map(|&x| x as f64).collect(),
            stride: (t / n) as i64,
            prediction: c.prediction(&[
                Prediction::Epsilon,
                Prediction::VPrediction,
                Prediction::Sample,
            ])?,
            ts,
            final_alpha,
            clip,
            schedule,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _rng: &mut NoiseRng) -> Result<Tensor> {
        let t = self.ts[i];
        // diffusers steps back by T / n whatever the spacing.
        let prev = t - self.stride;
        let abar = self.schedule.alpha_bar(t, self.final_alpha) as f64;
        let abar_prev = self.schedule.alpha_bar(prev, self.final_alpha) as f64;
        let (mut x0, eps) = split_prediction(self.prediction, out, x, abar)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        Ok(((x0 * abar_prev.sqrt())? + (eps * (1.0 - abar_prev).sqrt())?)?)
    }
}
