//! The bf16 attention's backward, in blocks of keys and queries.

use rayon::prelude::*;

use super::{blocks, exp_rows_shifted, Dims, KEY_BLOCK, QUERY_BLOCK};
use crate::attention::fused::{row_dots, softmax_grad_rows};
use crate::cpu::bf16::{self, Panels};
use crate::cpu::matmul::{Dst, Mat};
use crate::cpu::SendPtr;

/// The backward: `(dq, dk, dv)` for the inputs `(q, k, v)`, the output `o` and its gradient
/// `g`, from the forward's log-sum-exp `lse` (see the module `attention` for the equations).
/// One task per (batch row, head), which owns that head's columns of the gradients: for each
/// block of keys `j`, each block of queries `i` ([`Head::block`]). `dk` and `dv` are empty,
/// their products skipped, where `want` (`(k, v)`) says no one wants them.
#[allow(clippy::type_complexity)]
pub(in super::super) fn grads(
    (q, k, v, o, g): (&[f32], &[f32], &[f32], &[f32], &[f32]),
    lse: &[f64],
    dm: Dims,
    scale: f32,
    want: (bool, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, n, m, d, e } = dm;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; b * n * h * d],
        vec![0f32; if want.0 { b * m * h * d } else { 0 }],
        vec![0f32; if want.1 { b * m * h * e } else { 0 }],
    );
    let ptrs = [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()].map(SendPtr);
    let heads: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
        .collect();
    heads.par_iter().for_each(|&bh| {
        let head = bh.0 * h + bh.1;
        let lse = &lse[head * n..(head + 1) * n];
        let op = Head::new((q, k, v, o, g), lse, dm, bh);
        // this head's rows of a gradient: computed without a bound (`dk` or `dv` may be
        // empty, never written); this task alone writes head bh's columns
        let at = |ptr: SendPtr<f32>, rows: usize, row: usize, w: usize| Dst {
            ptr: ptr.get().wrapping_add(dm.at(bh, rows, row, w)),
            rs: h * w,
        };
        let mut scratch = Scratch::default();
        for kb in blocks(m, KEY_BLOCK) {
            for qb in blocks(n, QUERY_BLOCK) {
                let [dq, dk, dv] = ptrs;
                let dst = [at(dq, n, qb.0, d), at(dk, m, kb.0, d), at(dv, m, kb.0, e)];
                // SAFETY: each destination is rows of this head's columns, this task's alone
                // (`dk` and `dv` written only where wanted: they may be empty).
                unsafe { op.block((qb, kb), dst, (scale, want), &mut scratch) };
            }
        }
    });
    (dq, dk, dv)
}

/// One head's operands, packed once each in every orientation a product reads it, and its
/// rows' statistics.
struct Head {
    /// `Q` as the left operand of `Q_i K_j^T`, and as the right one of `dS^T Q_i`.
    queries: (Panels, Panels),
    /// `G` as the left operand of `G_i V_j^T`, and as the right one of `P^T G_i`.
    grads: (Panels, Panels),
    /// `K^T` for `Q_i K_j^T`, and `K` for `dS K_j`.
    keys: (Panels, Panels),
    /// `V^T` for `G_i V_j^T`.
    values_t: Panels,
    /// Each query row's log-sum-exp.
    lse: Vec<f32>,
    /// Each query row's `D = rowsum(G O)`.
    delta: Vec<f32>,
}

/// A task's buffers, reused from block to block: the scores (then `P`), `dP` (then `dS`), and
/// three packing buffers.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    words: [Vec<u32>; 3],
}

impl Head {
    #[allow(clippy::type_complexity)]
    fn new(
        (q, k, v, o, g): (&[f32], &[f32], &[f32], &[f32], &[f32]),
        lse: &[f64],
        dm: Dims,
        bh: (usize, usize),
    ) -> Head {
        let Dims { n, m, d, e, .. } = dm;
        let (qh, kh, vh) = (
            dm.head(q, bh, n, d),
            dm.head(k, bh, m, d),
            dm.head(v, bh, m, e),
        );
        let (gh, oh) = (dm.head(g, bh, n, e), dm.head(o, bh, n, e));
        Head {
            queries: (Panels::left(&qh, vec![]), Panels::right(&qh, vec![])),
            grads: (Panels::left(&gh, vec![]), Panels::right(&gh, vec![])),
            keys: (Panels::right(&kh.t(), vec![]), Panels::right(&kh, vec![])),
            values_t: Panels::right(&vh.t(), vec![]),
            lse: lse.iter().map(|&x| x as f32).collect(),
            delta: row_dots(gh, oh),
        }
    }

    /// Queries `qb` against keys `kb`: `P = e^(scale Q_i K_j^T - lse_i)`, `dV_j += P^T G_i`,
    /// `dP = G_i V_j^T`, `dS = scale P (dP - D_i)`, `dQ_i += dS K_j`, `dK_j += dS^T Q_i` into
    /// `[dq, dk, dv]` (at the block's first row), each written by the first block it sums;
    /// `dK_j` and `dV_j` only where `want` (`(k, v)`) asks for them.
    ///
    /// # Safety
    /// `bf16::supported()`; the destinations valid for the block's rows of `d` (`dq`, `dk`) or
    /// `e` (`dv`) numbers, written by no one else meanwhile.
    unsafe fn block(
        &self,
        (qb, kb): ((usize, usize), (usize, usize)),
        [dq, dk, dv]: [Dst<f32>; 3],
        (scale, want): (f32, (bool, bool)),
        scratch: &mut Scratch,
    ) {
        let (c, mb) = (qb.1 - qb.0, kb.1 - kb.0);
        let (first_i, first_j) = (qb.0 == 0, kb.0 == 0);
        scratch.p.resize(c * mb, 0.0);
        scratch.ds.resize(c * mb, 0.0);
        let (p, ds) = (&mut scratch.p[..c * mb], &mut scratch.ds[..c * mb]);
        let [w0, w1, w2] = std::mem::take(&mut scratch.words);
        // SAFETY (the products): the caller's promise; `p` and `ds` are this task's.
        unsafe {
            let (qi, kj) = (self.queries.0.all().lines(qb), self.keys.0.all().lines(kb));
            bf16::multiply(Dst::dense(p), qi, kj, scale, false);
        }
        exp_rows_shifted(p, mb, &self.lse[qb.0..qb.1]);
        let w0 = if want.1 {
            // (pair panels whatever the kernels: tiles would repack `P^T`, which multiplies
            // only a head's width of gradients)
            let pt = Panels::left_pairs(&Mat::new(&*p, c, mb).t(), w0);
            unsafe { bf16::multiply(dv, pt.all(), self.grads.1.all().depth(qb), 1.0, !first_i) };
            pt.into_buffer()
        } else {
            w0
        };
        unsafe {
            let (gi, vj) = (self.grads.0.all().lines(qb), self.values_t.all().lines(kb));
            bf16::multiply(Dst::dense(ds), gi, vj, 1.0, false);
        }
        softmax_grad_rows(p, ds, &self.delta[qb.0..qb.1], scale);
        let ds_rows = Panels::left(&Mat::new(&*ds, c, mb), w1);
        unsafe {
            let kj = self.keys.1.all().depth(kb);
            bf16::multiply(dq, ds_rows.all(), kj, 1.0, !first_j);
        }
        let w2 = if want.0 {
            let ds_t = Panels::left_pairs(&Mat::new(&*ds, c, mb).t(), w2);
            let qi = self.queries.1.all().depth(qb);
            unsafe { bf16::multiply(dk, ds_t.all(), qi, 1.0, !first_i) };
            ds_t.into_buffer()
        } else {
            w2
        };
        scratch.words = [w0, ds_rows.into_buffer(), w2];
    }
}
