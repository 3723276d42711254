//! # sample: schedulers and the text-to-image pipeline
//!
//! - [`schedulers`]: DDIM, DDPM, PNDM, Euler, Euler ancestral, DPM-Solver++ 2M (with and without
//!   Karras sigmas), one file each, built from a model's scheduler config by diffusers' rules and
//!   equal to diffusers' on the reference fixtures;
//! - [`noise`]: forward diffusion and training targets (what the trainer needs);
//! - [`rng`]: seeded host-side noise, so runs repeat on every device;
//! - [`pipeline`]: prompts to images with classifier-free guidance, base model plus deltas;
//! - [`infotext`]: the A1111-style `parameters` text PNGs carry, written and parsed back.
//!
//! Pipelines don't train: nothing here holds an optimizer; schedulers are importable alone.
#![deny(missing_docs)]

mod error;
pub mod infotext;
pub mod noise;
pub mod pipeline;
pub mod png_io;
pub mod rng;
pub mod schedulers;

pub use error::{Error, Result};
pub use infotext::Infotext;
pub use pipeline::{apply_deltas, Generated, Pipeline, Request, Step};
pub use rng::{NoiseRng, RngState};
pub use schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
