//! Schedulers: one file each, all built from a model's `scheduler_config.json` by the rules of
//! diffusers' `from_config` (see [`config`]), and equal to diffusers' on the reference fixtures.
//!
//! | name | diffusers class | noise |
//! |---|---|---|
//! | `ddim` | `DDIMScheduler` (eta 0) | none |
//! | `ddpm` | `DDPMScheduler` | every step |
//! | `pndm` | `PNDMScheduler` | none |
//! | `euler` | `EulerDiscreteScheduler` | none |
//! | `euler-a` | `EulerAncestralDiscreteScheduler` | every step |
//! | `dpmpp-2m` | `DPMSolverMultistepScheduler`, dpmsolver++, order 2 | none |
//! | `dpmpp-2m-karras` | the same with `use_karras_sigmas` | none |
//!
//! A scheduler is built for a number of steps (the state `set_timesteps` makes in diffusers
//! cannot be forgotten here), then driven by step index: [`Scheduler::scale_model_input`], the
//! model, [`Scheduler::step`].

pub mod common;
pub mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod pndm;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde_json::Value;

pub use common::NoiseSchedule;
pub use config::{Prediction, SchedulerConfig, Spacing};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolver;
pub use euler::Euler;
pub use pndm::Pndm;

use crate::rng::NoiseRng;
use crate::{Error, Result};

/// What every scheduler does.
pub trait Scheduler: Send {
    /// The timesteps the model is called at, one per step (whole numbers for most schedulers,
    /// fractions for Karras-sigma Euler).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: initial latents are `noise * this`.
    fn init_noise_sigma(&self) -> f64;

    /// The sigmas of sigma-space schedulers (one more than the steps, ending at the final sigma).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// The model input at step `i` (Euler scales by `1 / sqrt(sigma^2 + 1)`).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;

    /// The sample after step `i`, from the model's output; stochastic schedulers draw from `rng`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut NoiseRng,
    ) -> Result<Tensor>;
}

/// The schedulers `atomtune sample --scheduler` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// DDIM.
    Ddim,
    /// DDPM.
    Ddpm,
    /// PNDM (PLMS when the config skips PRK steps).
    Pndm,
    /// Euler.
    Euler,
    /// Euler ancestral.
    EulerAncestral,
    /// DPM-Solver++ 2M.
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras sigmas.
    DpmPp2mKarras,
}

impl SchedulerKind {
    /// Every kind.
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The name users type.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The sampler's name in A1111's infotext.
    pub fn a1111_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Ddpm => "DDPM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// The kind whose diffusers class saved a config (`_class_name`), if we have it.
    pub fn from_class_name(class: &str) -> Option<Self> {
        Some(match class {
            "DDIMScheduler" => SchedulerKind::Ddim,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            "PNDMScheduler" => SchedulerKind::Pndm,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
            _ => return None,
        })
    }

    /// Whether it adds noise at each step.
    pub fn is_stochastic(&self) -> bool {
        matches!(self, SchedulerKind::Ddpm | SchedulerKind::EulerAncestral)
    }

    /// This scheduler, from `config` (a model's scheduler config, whatever class saved it), for
    /// `steps` inference steps.
    pub fn build(&self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let t = config.usize_or("num_train_timesteps", 1000)?;
        if steps == 0 || steps > t {
            return Err(Error::Request(format!(
                "--steps must be between 1 and {t}, not {steps}"
            )));
        }
        Ok(match self {
            SchedulerKind::Ddim => Box::new(Ddim::new(config, steps)?),
            SchedulerKind::Ddpm => Box::new(Ddpm::new(config, steps)?),
            SchedulerKind::Pndm => Box::new(Pndm::new(config, steps)?),
            SchedulerKind::Euler => Box::new(Euler::new(config, steps, false)?),
            SchedulerKind::EulerAncestral => Box::new(Euler::new(config, steps, true)?),
            SchedulerKind::DpmPp2m => Box::new(DpmSolver::new(config, steps)?),
            SchedulerKind::DpmPp2mKarras => Box::new(DpmSolver::new(
                &config.clone().with("use_karras_sigmas", Value::Bool(true)),
                steps,
            )?),
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::Request(format!("unknown scheduler `{s}` (ddim, ddpm, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras)")))
    }
}

/// `(x0, eps)` from a model output by prediction type, at cumulative alpha `abar`.
pub(crate) fn split_prediction(
    p: Prediction,
    out: &Tensor,
    x: &Tensor,
    abar: f64,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = (abar.sqrt(), (1.0 - abar).sqrt());
    Ok(match p {
        Prediction::Epsilon => (((x - (out * b)?)? / a)?, out.clone()),
        Prediction::Sample => (out.clone(), ((x - (out * a)?)? / b)?),
        Prediction::VPrediction => (((x * a)? - (out * b)?)?, ((out * a)? + (x * b)?)?),
    })
}
