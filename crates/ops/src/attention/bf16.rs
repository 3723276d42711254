//! The fused attention with bf16 products ([`crate::cpu::bf16`]), what `--dtype bf16` runs on
//! a CPU with AVX512-BF16: every product (`S = scale Q_c K^T` and `P V` forward; the scores
//! again, `P^T G`, `G V^T`, `dS K` and `dS^T Q` backward) takes bf16 operands with f32 sums, as
//! under PyTorch's autocast. Each head's keys and values are packed once for all its query
//! chunks (the general product would pack them again for every chunk), and the forward packs
//! each chunk's probabilities as the softmax makes them ([`bf16::pack_exp_rows`]), never
//! writing them in f32. Scores, probabilities, the softmax's statistics and gradient `dS`, the
//! sums and the outputs stay f32; the backward recomputes the probabilities from the kept
//! log-sum-exp.

use std::cell::Cell;

use rayon::prelude::*;

use super::Dims;
use crate::cpu::bf16::{self, Panels};
use crate::cpu::fastmath::simd_dispatch;
use crate::cpu::matmul::{Dst, Mat};
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

/// The backward with bf16 products: `(dq, dk, dv)` for the inputs `(q, k, v)`, the output `o`
/// and its gradient `g`, from the forward's log-sum-exp `lse` (see the module `attention` for
/// the equations). One task per (batch row, head), which owns that head's columns of the
/// gradients and takes its query chunks of `chunk` rows in turn; the head's keys and values
/// are packed once for all of them (`K^T` for the scores, `K` for `dQ = dS K`, `V^T` for
/// `dP = G V^T`). The probabilities and `dS` are f32, as are the sums; each product rounds its
/// operands to bf16, as PyTorch's autocast runs attention's backward.
#[allow(clippy::type_complexity)]
pub(super) fn grads(
    (q, k, v, o, g): (&[f32], &[f32], &[f32], &[f32], &[f32]),
    lse: &[f64],
    dm: Dims,
    scale: f32,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, n, m, d, e } = dm;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; b * n * h * d],
        vec![0f32; b * m * h * d],
        vec![0f32; b * m * h * e],
    );
    let ptrs = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    let heads: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    heads.par_iter().for_each(|&bh| {
        let (kh, vh) = (dm.head(k, bh, m, d), dm.head(v, bh, m, e));
        let (qh, gh, oh) = (
            dm.head(q, bh, n, d),
            dm.head(g, bh, n, e),
            dm.head(o, bh, n, e),
        );
        let keys_t = Panels::right(&kh.t(), Vec::new());
        let keys = Panels::right(&kh, Vec::new());
        let values_t = Panels::right(&vh.t(), Vec::new());
        // SAFETY (every write below): this task alone writes head bh's columns.
        let (dkh, dvh) = unsafe {
            let (dk, dv) = (ptrs.1.get(), ptrs.2.get());
            (
                Dst {
                    ptr: dk.add(dm.at(bh, m, 0, d)),
                    rs: h * d,
                },
                Dst {
                    ptr: dv.add(dm.at(bh, m, 0, e)),
                    rs: h * e,
                },
            )
        };
        let head = bh.0 * h + bh.1;
        let row_lse: Vec<f32> = lse[head * n..(head + 1) * n]
            .iter()
            .map(|&x| x as f32)
            .collect();
        let (mut p, mut ds) = (vec![0f32; chunk.min(n) * m], vec![0f32; chunk.min(n) * m]);
        let mut bufs: [Vec<u32>; 3] = Default::default();
        let all = |b: &Panels| (0, b.col_panels());
        for s in (0..n).step_by(chunk) {
            let c = chunk.min(n - s);
            let (qc, gc, oc) = (qh.rows(s, c), gh.rows(s, c), oh.rows(s, c));
            let (p, ds) = (&mut p[..c * m], &mut ds[..c * m]);
            let [b0, b1, b2] = std::mem::take(&mut bufs);
            let dqc = Dst {
                // SAFETY: rows s..s + c of head bh, which only this task writes.
                ptr: unsafe { ptrs.0.get().add(dm.at(bh, n, s, d)) },
                rs: h * d,
            };
            // SAFETY (the products): `worth_it` checked the instructions; each destination is
            // this task's (`p`, `ds`) or its head's columns.
            // P = e^(scale Q K^T - lse)
            let rows = Panels::left(&qc, b0);
            unsafe { bf16::multiply(Dst::dense(p), &rows, &keys_t, all(&keys_t), scale, false) };
            super::fused::exp_rows_shifted_f32(p, m, &row_lse[s..s + c]);
            // dV += P^T G
            let (pt, cols) = (
                Panels::left(&Mat::new(&*p, c, m).t(), b1),
                Panels::right(&gc, b2),
            );
            unsafe { bf16::multiply(dvh, &pt, &cols, all(&cols), 1.0, true) };
            // dP = G V^T, then dS = scale P (dP - rowsum(G O))
            let rows = Panels::left(&gc, rows.into_buffer());
            unsafe { bf16::multiply(Dst::dense(ds), &rows, &values_t, all(&values_t), 1.0, false) };
            super::fused::softmax_grad_rows(p, ds, (gc, oc), scale);
            // dQ = dS K; dK += dS^T Q
            let rows = Panels::left(&Mat::new(&*ds, c, m), rows.into_buffer());
            unsafe { bf16::multiply(dqc, &rows, &keys, all(&keys), 1.0, false) };
            let (dst, cols) = (
                Panels::left(&Mat::new(&*ds, c, m).t(), pt.into_buffer()),
                Panels::right(&qc, cols.into_buffer()),
            );
            unsafe { bf16::multiply(dkh, &dst, &cols, all(&cols), 1.0, true) };
            bufs = [rows.into_buffer(), dst.into_buffer(), cols.into_buffer()];
        }
    });
    (dq, dk, dv)
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
