//! # models: the Stable Diffusion model stack
//!
//! Our own differentiable SD 1.x / 2.x / XL models, proven equal to diffusers on the reference
//! fixtures (`../shared/fixtures`):
//!
//! - [`config`]: configs read from the diffusers / transformers `config.json` files;
//! - [`Unet`]: `UNet2DConditionModel`, every op with a backward (candle-transformers' UNet silently
//!   loses gradients, DESIGN.md "Why we own the UNet");
//! - [`layers`]: the adapter hook: every conv and linear registers its base weight by diffusers
//!   name, and `atoms` adapters attach there;
//! - [`ClipTextModel`] and [`ClipTokenizer`], [`Vae`]: the frozen text encoders and autoencoder;
//!   [`text`]: how the encoders' outputs become the UNet's conditioning (SDXL: two encoders);
//! - [`arch`]: the families (SD 1.x, 2.x, XL) deltas record;
//! - [`pipeline`]: loading a local diffusers folder, a hub repo id, or a random-weight preset
//!   ([`presets`]);
//! - [`weights`]: memory-mapped safetensors or seeded random weights, with errors that name the
//!   key and file.
//!
//! The kernels the models run on (attention, convs, linears, norms, GEGLU; fused on the CPU,
//! portable on every device) are the `ops` crate's; this crate holds the architecture and the
//! loading.
#![deny(missing_docs)]

pub mod arch;
mod checkpoint;
pub mod clip;
pub mod config;
mod error;
pub mod hub;
pub mod kohya;
pub mod layers;
pub mod merge;
pub mod nn;
pub mod pipeline;
pub mod presets;
pub mod resnet;
pub mod single_file;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use arch::Architecture;
pub use clip::{ClipEncoder, ClipOutput, ClipTextModel};
pub use config::{ClipConfig, TextTimeConfig, UnetConfig, VaeConfig};
pub use error::{Error, Result};
pub use layers::{Checkpointing, LayerKind, Layers, Targets};
pub use ops::{cpu_bf16, on_compute_thread, tune_process, weight_cache, Kernels};
pub use pipeline::{LoadOptions, ModelSpec, StableDiffusion};
pub use presets::Preset;
pub use text::{PromptEmbeds, TextEncoder, TextEncoders};
pub use tokenizer::{ClipTokenizer, Tokens};
pub use unet::{TextTime, Unet};
pub use vae::{LatentDist, Vae};
pub use weights::Weights;
