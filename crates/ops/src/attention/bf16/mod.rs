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
//!   as the softmax makes them ([`bf16::pack_exp_cols`]), never written in f32;
//! - backward (`backward.rs`): the probabilities recomputed from the forward's log-sum-exp.

mod backward;
mod forward;

pub(super) use backward::grads;
pub(super) use forward::run;

use super::Dims;
use crate::cpu::bf16;

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
/// Keys per block (a multiple of [`bf16::NR`] and of [`bf16::MR`], so that blocks start panels
/// of the keys packed once per head, as a right operand backward and a left one forward): a
/// block's scores (108 KB) stay in L2, and so do the backward's `dK_j` and `dV_j` while every
/// query block meets them.
const KEY_BLOCK: usize = 288;

/// Query and key blocks `(start, end)` of `n` queries and `m` keys.
fn blocks(len: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(block)
        .map(move |s| (s, (s + block).min(len)))
}

/// `max[j] = max(max[j], x[i][j])` over the rows of `cols` numbers of `x`: each query's
/// maximum over a block of transposed scores, 16 columns at a time down all rows (the strip's
/// maxima stay in a register).
///
/// # Panics
/// Where the CPU lacks AVX512F (callers check [`bf16::supported`]).
fn col_max(x: &[f32], cols: usize, max: &mut [f32]) {
    assert!(bf16::supported() && max.len() >= cols && x.len().is_multiple_of(cols.max(1)));
    // SAFETY: checked above.
    unsafe { col_max_avx512(x, cols, max) }
}

/// [`col_max`]'s loop.
///
/// # Safety
/// AVX512F must be present; `max` holds `cols` numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn col_max_avx512(x: &[f32], cols: usize, max: &mut [f32]) {
    use std::arch::x86_64::*;
    for j in (0..cols).step_by(16) {
        let mask = crate::cpu::bf16::first_lanes(cols - j);
        // SAFETY: masked to the strip's columns of `max` and of each row of `x`.
        unsafe {
            let mut m = _mm512_maskz_loadu_ps(mask, max.as_ptr().add(j));
            for row in x.chunks_exact(cols) {
                m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(mask, row.as_ptr().add(j)));
            }
            _mm512_mask_storeu_ps(max.as_mut_ptr().add(j), mask, m);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn col_max_avx512(_: &[f32], _: usize, _: &mut [f32]) {
    unreachable!("bf16 products need x86_64")
}

/// `x[i][j] = e^(x[i][j] - shift[i])` over the rows of `cols` numbers of `x`: a block's
/// probabilities from its scores and their rows' log-sum-exp, with the forward's exponential
/// ([`crate::cpu::fastmath::exp16`]), so that both passes see the same probabilities.
///
/// # Panics
/// Where the CPU lacks AVX512F (callers check [`bf16::supported`]).
fn exp_rows_shifted(x: &mut [f32], cols: usize, shift: &[f32]) {
    assert!(bf16::supported() && shift.len() * cols >= x.len());
    // SAFETY: checked above.
    unsafe { exp_rows_avx512(x, cols, shift) }
}

/// [`exp_rows_shifted`]'s loop.
///
/// # Safety
/// AVX512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_rows_avx512(x: &mut [f32], cols: usize, shift: &[f32]) {
    use crate::cpu::fastmath::exp16;
    use std::arch::x86_64::*;
    for (row, &sh) in x.chunks_exact_mut(cols).zip(shift) {
        let sh = _mm512_set1_ps(sh);
        for j in (0..cols).step_by(16) {
            let mask = crate::cpu::bf16::first_lanes(cols - j);
            // SAFETY: masked to the row's numbers.
            unsafe {
                let at = row.as_mut_ptr().add(j);
                let v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, at), sh));
                _mm512_mask_storeu_ps(at, mask, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_rows_avx512(_: &mut [f32], _: usize, _: &[f32]) {
    unreachable!("bf16 products need x86_64")
}
