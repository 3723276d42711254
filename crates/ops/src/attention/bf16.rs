//! The fused attention's forward with bf16 products ([`crate::cpu::bf16`]), what `--dtype bf16`
//! runs on a CPU with AVX512-BF16: `S = scale Q_c K^T` and `P V` take bf16 operands with f32
//! sums, as under PyTorch's autocast. Each head's keys and values are packed once for all its
//! query chunks (the general product would pack them again for every chunk), and each chunk's
//! probabilities are packed as the softmax makes them ([`bf16::pack_exp_rows`]), never written
//! in f32. The scores, the softmax's statistics, the sums and the output stay f32, and the
//! log-sum-exp the backward (f32) recomputes the probabilities from is kept as in f32.

use std::cell::Cell;

use rayon::prelude::*;

use super::Dims;
use crate::cpu::bf16::{self, Panels};
use crate::cpu::fastmath::simd_dispatch;
use crate::cpu::matmul::Dst;
use crate::cpu::SendPtr;

/// Whether the bf16 forward runs: bf16 products on, and a problem whose products repay their
/// packing (self-attention over a latent's positions; a cross-attention's 77 tokens stay f32).
pub(super) fn worth_it(dm: &Dims) -> bool {
    bf16::active() && dm.m >= 128 && dm.d >= 32 && dm.e >= 16
}

thread_local! {
    /// The last chunk's scores on this thread, for the next chunk (every number is written
    /// before it is read: no zeroing pass, no page faults).
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The last packed probability chunk's buffer on this thread, for the next chunk.
    static WORDS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// The forward on f32 `q`, `k`, `v` of shapes `dm`: the output and each query row's
/// log-sum-exp `[b, h, n]`, with score chunks of `chunk` query rows.
pub(super) fn run(
    (q, k, v): (&[f32], &[f32], &[f32]),
    dm: Dims,
    scale: f32,
    chunk: usize,
) -> (Vec<f32>, Vec<f64>) {
    let Dims { b, h, n, m, d, e } = dm;
    let heads: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    // keys as the right operand of `Q K^T` (`K^T`), values as that of `P V`
    let packed: Vec<(Panels, Panels)> = heads
        .par_iter()
        .map(|&bh| {
            let keys = Panels::right(&dm.head(k, bh, m, d).t(), Vec::new());
            (keys, Panels::right(&dm.head(v, bh, m, e), Vec::new()))
        })
        .collect();
    let mut out = vec![0f32; b * n * h * e];
    let mut lse = vec![0f64; b * h * n];
    let tasks: Vec<(usize, usize, usize)> = heads
        .iter()
        .flat_map(|&(bi, hi)| (0..n).step_by(chunk).map(move |s| (bi, hi, s)))
        .collect();
    let (out_ptr, lse_ptr) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    tasks.par_iter().for_each(|&(bi, hi, s)| {
        let c = chunk.min(n - s);
        let (keys, values) = &packed[bi * h + hi];
        let queries = Panels::left(&dm.head(q, (bi, hi), n, d).rows(s, c), Vec::new());
        let mut scores = SCORES.with(Cell::take);
        scores.resize(c * m, 0.0);
        // SAFETY: `worth_it` checked the instructions; `scores` is this task's `c x m`, each
        // number written (no accumulation).
        unsafe {
            let all = (0, keys.col_panels());
            bf16::multiply(Dst::dense(&mut scores), &queries, keys, all, scale, false)
        };
        let (mut max, mut sum) = (vec![0f32; c], vec![0f32; c]);
        row_max(&scores, m, &mut max);
        let words = WORDS.with(Cell::take);
        let probs = bf16::pack_exp_rows(&scores, (c, m), &max, &mut sum, words);
        let dst = Dst {
            // SAFETY: in bounds: row s of head hi of batch row bi.
            ptr: unsafe { out_ptr.get().add(dm.at((bi, hi), n, s, e)) },
            rs: h * e,
        };
        // SAFETY: each task writes its own rows s..s + c of its own head's columns.
        unsafe { bf16::multiply(dst, &probs, values, (0, values.col_panels()), 1.0, false) };
        WORDS.with(|w| w.set(probs.into_buffer()));
        SCORES.with(|w| w.set(scores));
        for i in 0..c {
            let inv = 1.0 / sum[i];
            // SAFETY: as above; row i of this task's block, and its own log-sum-exp slot.
            unsafe {
                let row = std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.rs), e);
                row.iter_mut().for_each(|x| *x *= inv);
                *lse_ptr.get().add((bi * h + hi) * n + s + i) = (max[i] + sum[i].ln()) as f64;
            }
        }
    });
    (out, lse)
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
