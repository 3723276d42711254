//! # train: the DreamBooth trainer (not built yet)
//!
//! This crate will hold the dataset, prior preservation, the training loop with our own AdamW,
//! checkpoints and exact resume (DESIGN.md sections 2 and 3). It is empty today; see the issue
//! "DreamBooth trainer: `atomtune train`".
#![deny(missing_docs)]
