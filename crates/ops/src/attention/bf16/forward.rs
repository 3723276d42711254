//! The bf16 attention's forward: an online softmax over blocks of keys.

use rayon::prelude::*;

use super::{blocks, col_max, Dims, KEY_BLOCK, QUERY_BLOCK};
use crate::cpu::bf16::{self, Panels};
use crate::cpu::matmul::Dst;
use crate::cpu::SendPtr;

/// The forward on f32 `q`, `k`, `v` of shapes `dm`: the output and each query row's
/// log-sum-exp `[b, h, n]`. One task per (batch row, head, block of queries).
pub(in super::super) fn run(
    (q, k, v): (&[f32], &[f32], &[f32]),
    dm: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f64>) {
    let Dims { b, h, n, m, d, e } = dm;
    let heads: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    // per head: keys as the left operand of the transposed scores `K Q^T`, queries as its
    // right one (`Q^T`), values as that of `P V`
    let packed: Vec<[Panels; 3]> = heads
        .par_iter()
        .map(|&bh| {
            [
                Panels::left(&dm.head(k, bh, m, d), Vec::new()),
                Panels::right(&dm.head(q, bh, n, d).t(), Vec::new()),
                Panels::right(&dm.head(v, bh, m, e), Vec::new()),
            ]
        })
        .collect();
    let mut out = vec![0f32; b * n * h * e];
    let mut lse = vec![0f64; b * h * n];
    let tasks: Vec<(usize, (usize, usize))> = (0..heads.len())
        .flat_map(|head| blocks(n, QUERY_BLOCK).map(move |qb| (head, qb)))
        .collect();
    let (out_ptr, lse_ptr) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    tasks.par_iter().for_each(|&(head, qb)| {
        let (acc, row_lse) = query_block(&packed[head], qb, (m, e), scale);
        for (r, (row, &l)) in acc.chunks_exact(e).zip(&row_lse).enumerate() {
            // SAFETY: row qb.0 + r of this head and its log-sum-exp slot: this task's alone.
            unsafe {
                let dst = out_ptr.get().add(dm.at(heads[head], n, qb.0 + r, e));
                std::slice::from_raw_parts_mut(dst, e).copy_from_slice(row);
                *lse_ptr.get().add(head * n + qb.0 + r) = l as f64;
            }
        }
    });
    (out, lse)
}

/// The output rows `[c, e]` of the queries `qb` of one head (`[keys, queries^T, values]`
/// packed) over its `m` keys, and their log-sum-exp. The keys come a block at a time, their
/// scores transposed (`S^T = K_j Q_i^T`, `[keys, queries]`), so that each query's maximum and
/// sum run along the rows and a pair of keys' probabilities is two rows paired lane by lane
/// ([`bf16::pack_exp_cols`]); the block's running maxima `mx`, sums `l` and unnormalised output
/// `acc` are rescaled by `e^(mx_old - mx_new)` when a key block raises a maximum.
fn query_block(
    [keys, queries_t, values]: &[Panels; 3],
    qb: (usize, usize),
    (m, e): (usize, usize),
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let c = qb.1 - qb.0;
    let (mut s_t, mut words) = (vec![0f32; KEY_BLOCK.min(m) * c], Vec::new());
    let (mut acc, mut mx, mut l) = (vec![0f32; c * e], vec![f32::NEG_INFINITY; c], vec![0f32; c]);
    let mut new_mx = vec![0f32; c];
    for kb in blocks(m, KEY_BLOCK) {
        let mb = kb.1 - kb.0;
        let s_t = &mut s_t[..mb * c];
        // SAFETY: `worth_it` checked the instructions; `s_t` is this task's `mb x c`.
        unsafe {
            let (kj, qi) = (keys.all().lines(kb), queries_t.all().lines(qb));
            bf16::multiply(Dst::dense(s_t), kj, qi, scale, false);
        }
        new_mx.copy_from_slice(&mx);
        col_max(s_t, c, &mut new_mx);
        for r in 0..c {
            if kb.0 > 0 && new_mx[r] > mx[r] {
                let alpha = (mx[r] - new_mx[r]).exp();
                l[r] *= alpha;
                acc[r * e..(r + 1) * e].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        let probs = bf16::pack_exp_cols(s_t, (mb, c), &new_mx, &mut l, words);
        // SAFETY: as above; `acc` is this task's `c x e`.
        unsafe {
            let vj = values.all().depth(kb);
            bf16::multiply(Dst::dense(&mut acc), probs.all(), vj, 1.0, kb.0 > 0);
        }
        words = probs.into_buffer();
        mx.copy_from_slice(&new_mx);
    }
    for (row, &l) in acc.chunks_exact_mut(e).zip(&l) {
        row.iter_mut().for_each(|x| *x /= l);
    }
    let lse = mx.iter().zip(&l).map(|(m, l)| m + l.ln()).collect();
    (acc, lse)
}
