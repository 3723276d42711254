//! # models: the Stable Diffusion model stack (not built yet)
//!
//! This crate will hold our own differentiable SD model code, proven equal to diffusers on the
//! reference fixtures: configs read from diffusers files, the UNet with an adapter hook on every
//! conv and linear layer by its diffusers name, the CLIP text encoder and tokenizer, the VAE, and
//! loading from a local diffusers folder or a hub repo id (DESIGN.md section 3). It is empty
//! today; see the issue "Stable Diffusion model stack in crates/models".
#![deny(missing_docs)]
