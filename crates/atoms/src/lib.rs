//! # atoms: filter-atom adapters
//!
//! The method of "Large Convolutional Model Tuning via Filter Subspace" (Chen, Miao, Qiu 2024,
//! [arXiv 2403.00269](https://arxiv.org/abs/2403.00269)): every convolution weight is seen as
//! coefficients times a few **filter atoms**; only the atoms are tuned, the coefficients stay
//! frozen. For all of SD 1.5 that is a few thousand numbers, and the result fits in a delta file of
//! kilobytes. `../shared/DESIGN.md` section 1 gives the equations.
//!
//! - [`layout`]: how a conv or linear weight is seen as a matrix of small filters;
//! - [`dictionary`]: atoms and coefficients from a frozen weight (SVD by default, or lasso);
//! - [`adapter`]: the trainable adapters (`atoms`, `atoms-rec`, `lora`, `full`) that build the
//!   effective weight `W' = W + scale * dW` with differentiable candle ops;
//! - [`delta`]: the `.safetensors` delta file: write, read and validate against a base, merge;
//! - [`base`]: the base weights a delta is checked against and applied to.
//!
//! This crate depends on candle-core only; model code attaches adapters by layer name.
#![deny(missing_docs)]

pub mod adapter;
pub mod dictionary;
mod error;
pub mod layout;

pub use adapter::{Adapter, AdapterConfig, FilterTransform, LayerAdapter, Method};
pub use dictionary::{Dictionary, DictionaryKind, LassoOptions};
pub use error::{Error, Result};
pub use layout::{Block, Layout};
pub mod base;
pub mod delta;
pub mod export;
pub mod fingerprint;
pub mod io;
pub mod kohya;

pub use base::{BaseWeights, SafetensorsBase, TensorBase};
pub use delta::{BaseFit, Delta, DeltaMeta, EMBEDDING_PREFIX};
