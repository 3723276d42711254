//! The fused attention with bf16 products ([`crate::cpu::bf16`]), what `--dtype bf16` runs on
//! a CPU with AVX512-BF16: every product (`S = scale Q K^T` and `P V` forward; the scores again,
//! `P^T G`, `G V^T`, `dS K` and `dS^T Q` backward) takes bf16 operands with f32 sums, as under
//! PyTorch's autocast. Both passes work in blocks of [`QUERY_BLOCK`] queries by [`KEY_BLOCK`]
//! keys (FlashAttention's tiling, Dao et al. 2022, arXiv 2205.14135, and FlashAttention-2's
//! loop order backward, Dao 2023, arXiv 2307.08691), so that a block's scores stay in L2; each
//! head's operands are packed once, in every orientation a product reads them, and the
//! products run on blocks of them ([`bf16::Block`]). Scores, probabilities, the softmax's
//! statistics and gradient `dS`, the sums and the outputs stay f32.
//!
//! - forward (`forward.rs`): an online softmax over the key blocks; the probabilities packed
//!   as the softmax makes them ([`bf16::pack_exp_rows`]), never written in f32;
//! - backward (`backward.rs`): the probabilities recomputed from the forward's log-sum-exp.

mod backward;
mod forward;

pub(super) use backward::grads;
pub(super) use forward::run;

use super::Dims;
use crate::cpu::bf16;
use crate::cpu::fastmath::simd_dispatch;

/// Whether the bf16 path runs: bf16 products on, and a problem whose products repay their
/// packing: self-attention over a latent's positions, and cross-attention to 77 text tokens
/// (at 4096 positions, 8 heads of 40: 25 ms forward and backward in f32, 16.7 ms here:
/// `cargo bench -p atomtune-ops --bench attention -- --keys 77`).
pub(super) fn worth_it(dm: &Dims) -> bool {
    bf16::active() && dm.m >= 64 && dm.d >= 32 && dm.e >= 16
}

/// Query rows per block (a multiple of [`bf16::MR`], so that blocks start row panels of the
/// queries packed once per head).
const QUERY_BLOCK: usize = 96;
/// Keys per block (a multiple of [`bf16::NR`]): a block's scores (96 KB) stay in L2, and so do
/// the backward's `dK_j` and `dV_j` while every query block meets them.
const KEY_BLOCK: usize = 256;

/// Query and key blocks `(start, end)` of `n` queries and `m` keys.
fn blocks(len: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(block)
        .map(move |s| (s, (s + block).min(len)))
}

simd_dispatch! {
    /// Each row's maximum of the rows of `m` numbers of `x`.
    fn row_max(x: &[f32], m: usize, max: &mut [f32]) = row_max_body;
}

#[inline(always)]
fn row_max_body(x: &[f32], m: usize, max: &mut [f32]) {
    for (row, mx) in x.chunks_exact(m).zip(max) {
        *mx = super::fused::lane_max(row);
    }
}
