//! The fused attention with bf16 products ([`crate::cpu::bf16`]), what `--dtype bf16` runs on
//! a CPU with AVX512-BF16: every product (`S = scale Q_c K^T` and `P V` forward; the scores
//! again, `P^T G`, `G V^T`, `dS K` and `dS^T Q` backward) takes bf16 operands with f32 sums, as
//! under PyTorch's autocast. Each head's keys and values are packed once for all its query
//! chunks (the general product would pack them again for every chunk), and the forward packs
//! each chunk's probabilities as the softmax makes them ([`bf16::pack_exp_rows`]), never
//! writing them in f32. Scores, probabilities, the softmax's statistics and gradient `dS`, the
//! sums and the outputs stay f32; the backward recomputes the probabilities from the kept
//! log-sum-exp.

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

/// Query rows per block, forward and backward (a multiple of [`bf16::MR`], so that blocks start
/// row panels of the queries packed once per head).
const QUERY_BLOCK: usize = 96;
/// Keys per block, forward and backward (a multiple of [`bf16::NR`]): a block's scores (96 KB)
/// stay in L2, and so do the backward's `dK_j` and `dV_j` while every query block meets them.
const KEY_BLOCK: usize = 256;

/// The forward on f32 `q`, `k`, `v` of shapes `dm`: the output and each query row's
/// log-sum-exp `[b, h, n]`. One task per (batch row, head, block of queries), which meets the
/// head's keys a block at a time with an online softmax (FlashAttention's, Dao et al. 2022):
/// the block's running row maxima `mx`, sums `l` and unnormalised output `acc`, rescaled by
/// `e^(mx_old - mx_new)` when a key block raises a maximum.
pub(super) fn run(
    (q, k, v): (&[f32], &[f32], &[f32]),
    dm: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f64>) {
    let Dims { b, h, n, m, d, e } = dm;
    let heads: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    // per head: queries as the left operand of `Q K^T`, keys as its right one (`K^T`), values
    // as that of `P V`
    let packed: Vec<[Panels; 3]> = heads
        .par_iter()
        .map(|&bh| {
            [
                Panels::left(&dm.head(q, bh, n, d), Vec::new()),
                Panels::right(&dm.head(k, bh, m, d).t(), Vec::new()),
                Panels::right(&dm.head(v, bh, m, e), Vec::new()),
            ]
        })
        .collect();
    let mut out = vec![0f32; b * n * h * e];
    let mut lse = vec![0f64; b * h * n];
    let tasks: Vec<(usize, usize)> = (0..heads.len())
        .flat_map(|head| (0..n).step_by(QUERY_BLOCK).map(move |i0| (head, i0)))
        .collect();
    let (out_ptr, lse_ptr) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    tasks.par_iter().for_each(|&(head, i0)| {
        let [queries, keys, values] = &packed[head];
        let qb = (i0, (i0 + QUERY_BLOCK).min(n));
        let c = qb.1 - qb.0;
        let (mut s, mut words) = (vec![0f32; c * KEY_BLOCK.min(m)], Vec::new());
        let (mut acc, mut mx, mut l) =
            (vec![0f32; c * e], vec![f32::NEG_INFINITY; c], vec![0f32; c]);
        let (mut new_mx, mut sums) = (vec![0f32; c], vec![0f32; c]);
        for j0 in (0..m).step_by(KEY_BLOCK) {
            let kb = (j0, (j0 + KEY_BLOCK).min(m));
            let mb = kb.1 - kb.0;
            let s = &mut s[..c * mb];
            // SAFETY: `worth_it` checked the instructions; `s` is this task's `c x mb`.
            unsafe {
                let (qi, kj) = (queries.all().lines(qb), keys.all().lines(kb));
                bf16::multiply(Dst::dense(s), qi, kj, scale, false);
            }
            row_max(s, mb, &mut new_mx);
            for r in 0..c {
                new_mx[r] = new_mx[r].max(mx[r]);
                if j0 > 0 && new_mx[r] > mx[r] {
                    let alpha = (mx[r] - new_mx[r]).exp();
                    l[r] *= alpha;
                    acc[r * e..(r + 1) * e].iter_mut().for_each(|x| *x *= alpha);
                }
            }
            let probs = bf16::pack_exp_rows(s, (c, mb), &new_mx, &mut sums, words);
            // SAFETY: as above; `acc` is this task's `c x e`.
            unsafe {
                let vj = values.all().depth(kb);
                bf16::multiply(Dst::dense(&mut acc), probs.all(), vj, 1.0, j0 > 0);
            }
            words = probs.into_buffer();
            for r in 0..c {
                l[r] += sums[r];
            }
            mx.copy_from_slice(&new_mx);
        }
        let (bi, hi) = heads[head];
        for (r, row) in acc.chunks_exact(e).enumerate() {
            let inv = 1.0 / l[r];
            // SAFETY: row i0 + r of head hi of batch row bi, and its log-sum-exp slot: this
            // task's alone.
            unsafe {
                let dst = out_ptr.get().add(dm.at((bi, hi), n, i0 + r, e));
                std::slice::from_raw_parts_mut(dst, e)
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &x)| *o = x * inv);
                *lse_ptr.get().add(head * n + i0 + r) = (mx[r] + l[r].ln()) as f64;
            }
        }
    });
    (out, lse)
}

/// The backward with bf16 products: `(dq, dk, dv)` for the inputs `(q, k, v)`, the output `o`
/// and its gradient `g`, from the forward's log-sum-exp `lse` (see the module `attention` for
/// the equations). One task per (batch row, head), which owns that head's columns of the
/// gradients. Its operands are packed once, in each orientation a product reads them; then,
/// for each block of keys `j` and each block of queries `i` (FlashAttention-2's order, Dao
/// 2023, arXiv 2307.08691): `P = e^(scale Q_i K_j^T - lse_i)`, `dV_j += P^T G_i`, `dP = G_i
/// V_j^T`, `dS = scale P (dP - D_i)`, `dQ_i += dS K_j`, `dK_j += dS^T Q_i`, with `D = rowsum(G O)`.
/// A block's scores and `dS` (96 x 256) and its `dK_j`, `dV_j` stay in L2, where whole rows of
/// scores went out to memory and back several times. `P` and `dS` are f32, as are the sums;
/// each product rounds its operands to bf16, as PyTorch's autocast runs attention's backward.
#[allow(clippy::type_complexity)]
pub(super) fn grads(
    (q, k, v, o, g): (&[f32], &[f32], &[f32], &[f32], &[f32]),
    lse: &[f64],
    dm: Dims,
    scale: f32,
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
        let (qh, kh, vh) = (
            dm.head(q, bh, n, d),
            dm.head(k, bh, m, d),
            dm.head(v, bh, m, e),
        );
        let (gh, oh) = (dm.head(g, bh, n, e), dm.head(o, bh, n, e));
        // each operand in each orientation a product reads it
        let (queries, queries_k) = (Panels::left(&qh, vec![]), Panels::right(&qh, vec![]));
        let (grads, grads_k) = (Panels::left(&gh, vec![]), Panels::right(&gh, vec![]));
        let (keys_t, keys) = (Panels::right(&kh.t(), vec![]), Panels::right(&kh, vec![]));
        let values_t = Panels::right(&vh.t(), vec![]);
        let head = bh.0 * h + bh.1;
        let row_lse: Vec<f32> = lse[head * n..(head + 1) * n]
            .iter()
            .map(|&x| x as f32)
            .collect();
        let delta = super::fused::row_dots(gh, oh);
        let (mut p, mut ds) = (
            vec![0f32; QUERY_BLOCK * KEY_BLOCK],
            vec![0f32; QUERY_BLOCK * KEY_BLOCK],
        );
        let mut bufs: [Vec<u32>; 3] = Default::default();
        // SAFETY (every `Dst` below): this task alone writes head bh's columns.
        let at = |ptr: SendPtr<f32>, rows: usize, row: usize, w: usize| Dst {
            ptr: unsafe { ptr.get().add(dm.at(bh, rows, row, w)) },
            rs: h * w,
        };
        for j0 in (0..m).step_by(KEY_BLOCK) {
            let kb = (j0, (j0 + KEY_BLOCK).min(m));
            let mb = kb.1 - kb.0;
            for i0 in (0..n).step_by(QUERY_BLOCK) {
                let qb = (i0, (i0 + QUERY_BLOCK).min(n));
                let c = qb.1 - qb.0;
                let (p, ds) = (&mut p[..c * mb], &mut ds[..c * mb]);
                let [b0, b1, b2] = std::mem::take(&mut bufs);
                let (first_i, first_j) = (i0 == 0, j0 == 0);
                // SAFETY (the products): `worth_it` checked the instructions; each destination
                // is this task's (`p`, `ds`) or its head's rows of the gradients.
                unsafe {
                    // P = e^(scale Q_i K_j^T - lse_i)
                    let (qi, kj) = (queries.all().lines(qb), keys_t.all().lines(kb));
                    bf16::multiply(Dst::dense(p), qi, kj, scale, false);
                }
                super::fused::exp_rows_shifted_f32(p, mb, &row_lse[qb.0..qb.1]);
                let pt = Panels::left(&Mat::new(&*p, c, mb).t(), b0);
                unsafe {
                    // dV_j += P^T G_i; dP = G_i V_j^T
                    bf16::multiply(
                        at(ptrs.2, m, j0, e),
                        pt.all(),
                        grads_k.all().depth(qb),
                        1.0,
                        !first_i,
                    );
                    let (gi, vj) = (grads.all().lines(qb), values_t.all().lines(kb));
                    bf16::multiply(Dst::dense(ds), gi, vj, 1.0, false);
                }
                super::fused::softmax_grad_rows(p, ds, &delta[qb.0..qb.1], scale);
                let dsl = Panels::left(&Mat::new(&*ds, c, mb), b1);
                let dst = Panels::left(&Mat::new(&*ds, c, mb).t(), b2);
                unsafe {
                    // dQ_i += dS K_j; dK_j += dS^T Q_i
                    bf16::multiply(
                        at(ptrs.0, n, i0, d),
                        dsl.all(),
                        keys.all().depth(kb),
                        1.0,
                        !first_j,
                    );
                    bf16::multiply(
                        at(ptrs.1, m, j0, d),
                        dst.all(),
                        queries_k.all().depth(qb),
                        1.0,
                        !first_i,
                    );
                }
                bufs = [pt.into_buffer(), dsl.into_buffer(), dst.into_buffer()];
            }
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
