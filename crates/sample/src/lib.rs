//! # sample: schedulers and the text-to-image pipeline (not built yet)
//!
//! This crate will hold one file per scheduler (DDIM, DDPM, PNDM, Euler, Euler ancestral,
//! DPM-Solver++ 2M) built from a model's scheduler config, noise addition for training, and the
//! optimizer-free pipeline from prompts to images (DESIGN.md section 3). It is empty today; see the
//! issue "Sampler: schedulers equal to diffusers, and `atomtune sample`".
#![deny(missing_docs)]
