//! Euler's method on the probability-flow ODE in sigma space (Karras et al., "Elucidating the
//! Design Space of Diffusion-Based Generative Models", arXiv 2206.00364, Algorithm 2 without
//! churn), as diffusers' `EulerDiscreteScheduler`; and its ancestral variant (`euler-a`,
//! `EulerAncestralDiscreteScheduler`), which steps down to `sigma_down` and adds seeded noise of
//! `sigma_up`.
//!
//! The model sees `x / sqrt(sigma^2 + 1)`; `x0 = x - sigma eps`; `x_next = x + (x - x0) / sigma
//! * (sigma_next - sigma)`.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{
    interp, karras_sigmas, np_arange_down, np_linspace, sigma_to_t, NoiseSchedule,
};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::Scheduler;
use crate::rng::NoiseRng;
use crate::Result;

/// Euler or Euler ancestral, after `set_timesteps`.
pub struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_sigma: f64,
    prediction: Prediction,
    ancestral: bool,
}

/// The float timesteps of Euler-style schedulers (descending).
fn float_timesteps(spacing: Spacing, t: usize, n: usize, offset: usize) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .rev()
            .map(|&x| x as f32)
            .collect(),
        Spacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (t / n)) as f32 + offset as f32)
            .collect(),
        Spacing::Trailing => np_arange_down(t as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .map(|x| x.round_ties_even() as f32 - 1.0)
            .collect(),
    }
}

impl Euler {
    /// Builds it from a config (Euler's defaults for absent keys) for `n` steps; `ancestral`
    /// selects Euler ancestral (which has no Karras option in diffusers).
    pub fn new(c: &SchedulerConfig, n: usize, ancestral: bool) -> Result<Self> {
        if !ancestral {
            c.only("interpolation_type", &[Value::String("linear".into())])?;
            c.only("timestep_type", &[Value::String("discrete".into())])?;
            c.only("use_exponential_sigmas", &[Value::Bool(false)])?;
            c.only("use_beta_sigmas", &[Value::Bool(false)])?;
        }
        let mut schedule = NoiseSchedule::from_config(c)?;
        if c.bool_or("rescale_betas_zero_snr", false)? {
            let last = schedule.alphas_cumprod.len() - 1;
            schedule.alphas_cumprod[last] = 2f32.powi(-24);
        }
        let t = schedule.len();
        let spacing = c.spacing("linspace")?;
        let mut ts: Vec<f64> = float_timesteps(spacing, t, n, c.usize_or("steps_offset", 0)?)
            .iter()
            .map(|&x| x as f64)
            .collect();
        let all = schedule.sigmas();
        let mut sigmas: Vec<f64> = ts.iter().map(|&x| interp(x, &all)).collect();
        if !ancestral && c.bool_or("use_karras_sigmas", false)? {
            let log_sigmas: Vec<f32> = all.iter().map(|s| s.ln()).collect();
            let smin = c.f64_or("sigma_min", sigmas[sigmas.len() - 1])?;
            let smax = c.f64_or("sigma_max", sigmas[0])?;
            sigmas = karras_sigmas(smin, smax, n);
            ts = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = if ancestral {
            0.0
        } else {
            match c.str_or("final_sigmas_type", "zero")?.as_str() {
                "zero" => 0.0,
                "sigma_min" => all[0] as f64,
                other => {
                    return Err(c.err(format!(
                        "`final_sigmas_type` = {other:?} is not supported (zero, sigma_min)"
                    )))
                }
            }
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(last as f32);
        let max = sigmas.iter().cloned().fold(0f32, f32::max);
        let init_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        } as f64;
        let allowed: &[Prediction] = if ancestral {
            &[Prediction::Epsilon, Prediction::VPrediction]
        } else {
            &[
                Prediction::Epsilon,
                Prediction::VPrediction,
                Prediction::Sample,
            ]
        };
        Ok(Euler {
            timesteps: ts.iter().map(|&x| x as f32 as f64).collect(),
            sigmas,
            init_sigma,
            prediction: c.prediction(allowed)?,
            ancestral,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i] as f64;
        Ok((sample / (s * s + 1.0).sqrt())?)
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, rng: &mut NoiseRng) -> Result<Tensor> {
        let (s, next) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
        let x0 = match self.prediction {
            Prediction::Epsilon => (x - (out * s)?)?,
            Prediction::VPrediction => {
                ((out * (-s / (s * s + 1.0).sqrt()))? + (x / (s * s + 1.0))?)?
            }
            Prediction::Sample => out.clone(),
        };
        let derivative = ((x - x0)? / s)?;
        if !self.ancestral {
            return Ok((x + (derivative * (next - s))?)?);
        }
        let up = (next * next * (s * s - next * next) / (s * s)).sqrt();
        let down = (next * next - up * up).sqrt();
        let stepped = (x + (derivative * (down - s))?)?;
        let z = rng.randn(x.dims(), x.dtype(), x.device())?;
        Ok((stepped + (z * up)?)?)
    }
}
