//! # ops: the differentiable kernels under atomtune's models
//!
//! Every op a Stable Diffusion training step spends its time and memory in, each with a backward
//! that computes only the gradients someone needs, in two implementations behind one function:
//!
//! - **fused** (`*/fused.rs`): CPU kernels in f32 and f64 (im2col and `gemm`, chunked attention,
//!   vectorised norms), chosen on the CPU by default;
//! - **portable** (`*/portable.rs`): the same op from candle tensor ops, for every device and
//!   dtype (CUDA, Metal, and half precision anywhere). Its forward runs on inputs cut from the
//!   graph and hands its output to the graph through [`handoff`], whose backward recomputes what
//!   it needs from candle ops too; attention works in chunks of query rows and keeps one
//!   log-sum-exp per row, so nothing the size of a score matrix outlives a chunk.
//!
//! `ATOMTUNE_KERNELS=portable` makes the CPU run the portable code a GPU runs ([`Kernels`]), so
//! the device path is tested wherever the tests run. Each op also has a `*_slow` reference built
//! from plain candle ops and candle's own autograd, which the tests hold both implementations to.
//!
//! | op | function | fused CPU kernel | portable |
//! |---|---|---|---|
//! | softmax attention | [`attention::attention`] | chunked, recomputing backward | chunked, log-sum-exp |
//! | 2-d convolution | [`conv::conv2d`] | im2col + gemm, col2im input gradient | candle conv2d, input gradient as a conv |
//! | conv with `W' = Wr T` | [`conv::conv2d_transformed`] | `T` on the columns | `W'` formed per call |
//! | linear | [`linear::linear`] | gemm | candle matmul |
//! | group norm (+ SiLU) | [`group_norm::group_norm`] | two passes | candle ops |
//! | layer norm | [`layer_norm::layer_norm`] | one pass per row | candle's fused kernel |
//! | GEGLU | [`geglu::geglu`] | one pass | candle ops |
//!
//! [`process`] holds the CPU process settings the fused kernels are tuned for; `cpu/` what the
//! CPU kernels share (element types, the one wrapper around `gemm`, vectorised math);
//! [`cpu_bf16`] the f32 products that run with bf16 operands where it is on.
#![deny(missing_docs)]

pub mod attention;
pub mod conv;
mod cpu;
pub mod geglu;
pub mod group_norm;
pub mod handoff;
mod kernels;
pub mod layer_norm;
pub mod linear;
pub mod op_times;
pub mod process;
#[cfg(test)]
mod test_support;
pub mod weight_cache;

pub use cpu::bf16 as cpu_bf16;
pub use kernels::{Kernels, KERNELS_VAR};
pub use process::{on_compute_thread, tune_process};
pub use weight_cache::WeightCache;

/// The result type of every op: candle's, as candle-nn's ops return it.
pub type Result<T> = candle_core::Result<T>;
