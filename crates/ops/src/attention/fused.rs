//! The fused CPU attention: one op that never holds a whole score matrix. Queries are
//! processed in row chunks (`S = scale Q_c K^T`, softmax, `P V`), one task per (batch row, head,
//! chunk), reading and writing each head in place; the backward recomputes each chunk's
//! probabilities instead of keeping them (the idea of FlashAttention, Dao et al. 2022,
//! arXiv 2205.14135, without its GPU tiling).
//!
//! Its memory is a chunk per thread forward and a chunk of the batch backward, plus one number
//! per query row: the row's log-sum-exp `l = max + ln(sum e^(s - max))`, which the forward keeps
//! so that the backward forms `P = e^(S - l)` in one pass over the scores. The forward
//! normalises the `P V` rows (`e` numbers each), not the scores (`m`). f32 rows use the
//! vectorised exp of [`crate::cpu::fastmath`].

use std::sync::Mutex;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Dims;
use crate::cpu::fastmath::{exp_neg, simd_dispatch};
use crate::cpu::matmul::{self, Dst, Mat};
use crate::cpu::{as_f32, Float, SendPtr};
use crate::Result;

/// Bytes of scores a task holds at once (forward and backward: twice that). Larger chunks mean
/// fewer gemm calls, each packing the keys and values again, and deeper `P^T G`, `dS^T Q`
/// products: at SD 1.5's 4096 positions, 8 heads of 40, a forward and backward took
/// 0.62/0.51/0.32/0.28/0.28/0.27/0.27 s with chunks of 128K/256K/512K/1M/2M/4M/8M bytes (a
/// 2-core AMD EPYC with 1 MB of L2 per core; `cargo bench -p atomtune-ops --bench attention`).
/// Past 1 MB the gain is a few percent; 2 MB keeps each task's buffers small. (The bf16
/// products, `bf16.rs`, block queries and keys their own way.)
pub(super) const CHUNK_BYTES: usize = 2 << 20;

/// The fused op on contiguous f32 or f64 inputs of checked shapes `dm`, with score chunks of
/// about `chunk_bytes` per task.
pub(super) fn attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dm: Dims,
    scale: f64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = FusedAttention {
        dm,
        scale,
        chunk_bytes,
        log_sum_exp: Mutex::new(None),
    };
    q.apply_op3(&k, &v, op)
}

struct FusedAttention {
    dm: Dims,
    scale: f64,
    /// Bytes of scores a task holds at once.
    chunk_bytes: usize,
    /// Each query row's log-sum-exp of its scaled scores, `[b, heads, n]`, left by the forward
    /// for the backward (the op lives in the graph node it made, so one forward pairs with its
    /// backward).
    log_sum_exp: Mutex<Option<Vec<f64>>>,
}

/// The softmax rows of the op for one element type: f64 with std's `exp`, f32 vectorised.
trait Rows: Float {
    /// On each row of `m` numbers: `x <- e^(x - max)`, and the row's `max` and `sum` of those.
    fn exp_rows(x: &mut [Self], m: usize, max: &mut [Self], sum: &mut [Self]);

    /// On each row `i` of `m` numbers: `x <- e^(x - shift[i])`, where `shift[i]` is at least
    /// the row's maximum.
    fn exp_rows_shifted(x: &mut [Self], m: usize, shift: &[Self]);
}

impl Rows for f32 {
    fn exp_rows(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
        exp_rows_f32(x, m, max, sum)
    }

    fn exp_rows_shifted(x: &mut [f32], m: usize, shift: &[f32]) {
        exp_rows_shifted_f32(x, m, shift)
    }
}

impl Rows for f64 {
    fn exp_rows(x: &mut [f64], m: usize, max: &mut [f64], sum: &mut [f64]) {
        for ((row, mx), sm) in x.chunks_exact_mut(m).zip(max).zip(sum) {
            *mx = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            *sm = 0.0;
            for v in row.iter_mut() {
                *v = (*v - *mx).exp();
                *sm += *v;
            }
        }
    }

    fn exp_rows_shifted(x: &mut [f64], m: usize, shift: &[f64]) {
        for (row, &sh) in x.chunks_exact_mut(m).zip(shift) {
            for v in row.iter_mut() {
                *v = (*v - sh).exp();
            }
        }
    }
}

/// Lanes of the f32 row loops, written so they vectorise: 16 partial maxima and sums.
const LANES: usize = 16;

simd_dispatch! {
    /// [`Rows::exp_rows`] for f32.
    fn exp_rows_f32(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) = exp_rows_body;
}

simd_dispatch! {
    /// [`Rows::exp_rows_shifted`] for f32.
    pub(super) fn exp_rows_shifted_f32(x: &mut [f32], m: usize, shift: &[f32]) = exp_rows_shifted_body;
}

#[inline(always)]
fn exp_rows_body(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
    for ((row, mx), sm) in x.chunks_exact_mut(m).zip(max).zip(sum) {
        *mx = lane_max(row);
        let shift = *mx;
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp_neg(*v - shift);
                *s += *v;
            }
        }
        *sm = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_neg(*v - shift);
            *sm += *v;
        }
    }
}

/// The largest number of `row`, in [`LANES`] partial maxima (so that the loop vectorises).
#[inline(always)]
pub(super) fn lane_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[inline(always)]
fn exp_rows_shifted_body(x: &mut [f32], m: usize, shift: &[f32]) {
    for (row, &sh) in x.chunks_exact_mut(m).zip(shift) {
        for v in row.iter_mut() {
            *v = exp_neg(*v - sh);
        }
    }
}

/// Each row's dot product of `g` and `o` (as many rows): `D = rowsum(G O)` of the softmax's
/// backward, from the output gradient and the output.
pub(super) fn row_dots<T: Float>(g: Mat<'_, T>, o: Mat<'_, T>) -> Vec<T> {
    (0..g.rows)
        .map(|i| {
            let (gr, or) = (g.row(i), o.row(i));
            gr.iter()
                .zip(or)
                .fold(T::zero(), |acc, (&x, &y)| acc + x * y)
        })
        .collect()
}

/// `ds <- scale p (ds - delta[i])` on each row `i` of `p` and `ds` (as many rows as `delta`):
/// the softmax's backward, from the probabilities `p`, `dP` in `ds` and `D` ([`row_dots`]).
pub(super) fn softmax_grad_rows<T: Float>(p: &[T], ds: &mut [T], delta: &[T], scale: T) {
    let m = p.len() / delta.len().max(1);
    for ((pr, dr), &dl) in p.chunks_exact(m).zip(ds.chunks_exact_mut(m)).zip(delta) {
        for (x, &pv) in dr.iter_mut().zip(pr) {
            *x = scale * pv * (*x - dl);
        }
    }
}

/// [`matmul::gemm`] on the calling thread: the op parallelises over heads and chunks itself.
///
/// # Safety
/// As [`matmul::gemm`].
unsafe fn gemm<T: Float>(dst: Dst<T>, a: Mat<'_, T>, b: Mat<'_, T>, scale: T, accumulate: bool) {
    // SAFETY: the caller's promise.
    unsafe { matmul::gemm(gemm::Parallelism::None, dst, a, b, scale, accumulate) }
}

/// Query rows per chunk so a chunk's `rows x m` scores take about `chunk_bytes`.
pub(super) fn chunk_rows<T>(n: usize, m: usize, chunk_bytes: usize) -> usize {
    (chunk_bytes / (std::mem::size_of::<T>() * m.max(1))).clamp(1, n.max(1))
}

impl Dims {
    /// Head `hi` of batch row `bi` of a `[b, rows, h w]` tensor: `rows x w`, strided.
    pub(super) fn head<'a, T>(
        &self,
        x: &'a [T],
        (bi, hi): (usize, usize),
        rows: usize,
        w: usize,
    ) -> Mat<'a, T> {
        let rs = self.h * w;
        let start = bi * rows * rs + hi * w;
        Mat::strided(&x[start..(bi + 1) * rows * rs], rows, w, rs)
    }

    /// The offset of row `row`, head `hi`, batch row `bi` of a `[b, rows, h w]` tensor.
    pub(super) fn at(&self, (bi, hi): (usize, usize), rows: usize, row: usize, w: usize) -> usize {
        (bi * rows + row) * self.h * w + hi * w
    }
}

impl FusedAttention {
    /// Forward: `out` and each query row's log-sum-exp `[b, h, n]`, one task per (batch row,
    /// head, chunk of queries).
    fn run<T: Rows>(&self, q: &[T], k: &[T], v: &[T], dm: Dims) -> (Vec<T>, Vec<f64>) {
        let Dims { b, h, n, m, d, e } = dm;
        let mut out = vec![T::zero(); b * n * h * e];
        let mut lse = vec![0f64; b * h * n];
        let chunk = chunk_rows::<T>(n, m, self.chunk_bytes);
        let scale = T::from_f64(self.scale);
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
            .flat_map(|(bi, hi)| (0..n).step_by(chunk).map(move |s| (bi, hi, s)))
            .collect();
        let (out_ptr, lse_ptr) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
        tasks.par_iter().for_each(|&(bi, hi, s)| {
            let c = chunk.min(n - s);
            let mut p = vec![T::zero(); c * m];
            let (mut max, mut sum) = (vec![T::zero(); c], vec![T::zero(); c]);
            let qc = dm.head(q, (bi, hi), n, d).rows(s, c);
            let (kh, vh) = (dm.head(k, (bi, hi), m, d), dm.head(v, (bi, hi), m, e));
            // SAFETY: `p` is this task's own `c x m` buffer.
            unsafe { gemm(Dst::dense(&mut p), qc, kh.t(), scale, false) };
            T::exp_rows(&mut p, m, &mut max, &mut sum);
            let dst = Dst {
                // SAFETY: in bounds: row s of head hi of batch row bi.
                ptr: unsafe { out_ptr.get().add(dm.at((bi, hi), n, s, e)) },
                rs: h * e,
            };
            // SAFETY: each task writes its own rows s..s + c of its own head's columns.
            unsafe { gemm(dst, Mat::new(&p, c, m), vh, T::one(), false) };
            for i in 0..c {
                let inv = T::one() / sum[i];
                // SAFETY: as above; row i of this task's block, and its own log-sum-exp slot.
                unsafe {
                    let row = std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.rs), e);
                    row.iter_mut().for_each(|x| *x = *x * inv);
                    *lse_ptr.get().add((bi * h + hi) * n + s + i) =
                        (max[i] + sum[i].ln()).to_f64().unwrap_or(f64::NAN);
                }
            }
        });
        (out, lse)
    }

    /// Backward: `(dq, dk, dv)` in the inputs' layouts, one task per (batch row, head), which
    /// owns that head's columns of `dq`, `dk`, `dv`; query chunks in turn. The probabilities are
    /// recomputed from the forward's log-sum-exp `lse`. `dk` and `dv` are empty, their products
    /// skipped, where `want` (`(k, v)`) says no one wants them.
    #[allow(clippy::type_complexity)]
    fn grads<T: Rows>(
        &self,
        (q, k, v, o, g): (&[T], &[T], &[T], &[T], &[T]),
        lse: &[f64],
        dm: Dims,
        want: (bool, bool),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { b, h, n, m, d, e } = dm;
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); b * n * h * d],
            vec![T::zero(); if want.0 { b * m * h * d } else { 0 }],
            vec![T::zero(); if want.1 { b * m * h * e } else { 0 }],
        );
        let chunk = chunk_rows::<T>(n, m, self.chunk_bytes);
        let scale = T::from_f64(self.scale);
        let lse: Vec<T> = lse.iter().map(|&x| T::from_f64(x)).collect();
        let ptrs = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        let heads: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..h).map(move |hi| (bi, hi)))
            .collect();
        heads.par_iter().for_each(|&bh| {
            let (dq, dk, dv) = (ptrs.0.get(), ptrs.1.get(), ptrs.2.get());
            let (kh, vh) = (dm.head(k, bh, m, d), dm.head(v, bh, m, e));
            let (qh, gh, oh) = (
                dm.head(q, bh, n, d),
                dm.head(g, bh, n, e),
                dm.head(o, bh, n, e),
            );
            // SAFETY (every write below): this task alone writes head bh's columns; `dk` and
            // `dv` may be empty (never written), so their rows are computed without a bound.
            let (dkh, dvh) = (
                Dst {
                    ptr: dk.wrapping_add(dm.at(bh, m, 0, d)),
                    rs: h * d,
                },
                Dst {
                    ptr: dv.wrapping_add(dm.at(bh, m, 0, e)),
                    rs: h * e,
                },
            );
            let mut p = vec![T::zero(); chunk * m];
            let mut ds = vec![T::zero(); chunk * m];
            let row_lse = &lse[(bh.0 * h + bh.1) * n..(bh.0 * h + bh.1 + 1) * n];
            for s in (0..n).step_by(chunk) {
                let c = chunk.min(n - s);
                let (qc, gc, oc) = (qh.rows(s, c), gh.rows(s, c), oh.rows(s, c));
                let (p, ds) = (&mut p[..c * m], &mut ds[..c * m]);
                unsafe {
                    gemm(Dst::dense(p), qc, kh.t(), scale, false);
                    T::exp_rows_shifted(p, m, &row_lse[s..s + c]);
                    // dV += P^T G
                    if want.1 {
                        gemm(dvh, Mat::new(&*p, c, m).t(), gc, T::one(), true);
                    }
                    // dP = G V^T, then dS = scale P (dP - rowsum(G O))
                    gemm(Dst::dense(ds), gc, vh.t(), T::one(), false);
                }
                softmax_grad_rows(p, ds, &row_dots(gc, oc), scale);
                unsafe {
                    // dQ = dS K; dK += dS^T Q
                    let dqc = Dst {
                        ptr: dq.add(dm.at(bh, n, s, d)),
                        rs: h * d,
                    };
                    gemm(dqc, Mat::new(&*ds, c, m), kh, T::one(), false);
                    if want.0 {
                        gemm(dkh, Mat::new(&*ds, c, m).t(), qc, T::one(), true);
                    }
                }
            }
        });
        (dq, dk, dv)
    }

    /// [`CustomOp3::bwd`] on flat CPU tensors `(q, k, v, out, grad)` of dtype `T`: `dq`, and
    /// `dk` and `dv` where `want` (`(k, v)`) asks for them.
    #[allow(clippy::type_complexity)]
    fn backward<T: Rows + candle_core::WithDType>(
        &self,
        (q, k, v, o, g): (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
        dm: Dims,
        want: (bool, bool),
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o, g) = (
            q.to_vec1::<T>()?,
            k.to_vec1::<T>()?,
            v.to_vec1::<T>()?,
            o.to_vec1::<T>()?,
            g.to_vec1::<T>()?,
        );
        let kept = self
            .log_sum_exp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Only a backward without its forward lacks the statistics: recompute them.
        let lse = kept.unwrap_or_else(|| self.run(&q, &k, &v, dm).1);
        // the gradients as tensors of the inputs' shapes, from numbers of either path's type
        #[allow(clippy::type_complexity)]
        fn tensors<U: candle_core::WithDType>(
            (dq, dk, dv): (Vec<U>, Vec<U>, Vec<U>),
            Dims { b, h, n, m, d, e }: Dims,
            want: (bool, bool),
        ) -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
            let dev = &candle_core::Device::Cpu;
            let dk = want
                .0
                .then(|| Tensor::from_vec(dk, (b, m, h * d), dev))
                .transpose()?;
            let dv = want
                .1
                .then(|| Tensor::from_vec(dv, (b, m, h * e), dev))
                .transpose()?;
            Ok((Tensor::from_vec(dq, (b, n, h * d), dev)?, dk, dv))
        }
        // f32 inputs of a problem the bf16 products take run there (as the forward did)
        if let [Some(q), Some(k), Some(v), Some(o), Some(g)] =
            [&q, &k, &v, &o, &g].map(|x| as_f32(x))
        {
            if super::bf16::worth_it(&dm) {
                let scale = self.scale as f32;
                let grads = super::bf16::grads((q, k, v, o, g), &lse, dm, scale, want);
                return tensors(grads, dm, want);
            }
        }
        tensors(self.grads((&q, &k, &v, &o, &g), &lse, dm, want), dm, want)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "atomtune-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _time = crate::op_times::start(|| {
            let Dims { n, m, d, .. } = self.dm;
            format!("attention forward n{n} m{m} d{d}")
        });
        let (Some((a1, z1)), Some((a2, z2)), Some((a3, z3))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("atomtune-attention needs contiguous inputs");
        };
        let dm = self.dm;
        let (out, lse) = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let qkv = (&q[a1..z1], &k[a2..z2], &v[a3..z3]);
                let (o, lse) = if super::bf16::worth_it(&dm) {
                    super::bf16::run(qkv, dm, self.scale as f32)
                } else {
                    self.run(qkv.0, qkv.1, qkv.2, dm)
                };
                (CpuStorage::F32(o), lse)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (o, lse) = self.run(&q[a1..z1], &k[a2..z2], &v[a3..z3], dm);
                (CpuStorage::F64(o), lse)
            }
            _ => candle_core::bail!("atomtune-attention: unsupported dtype {:?}", s1.dtype()),
        };
        *self.log_sum_exp.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, Shape::from((dm.b, dm.n, dm.h * dm.e))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _time = crate::op_times::start(|| {
            let Dims { n, m, d, .. } = self.dm;
            format!("attention backward n{n} m{m} d{d}")
        });
        let dm = self.dm;
        // The inputs are small next to the scores: copy them out of candle's storage.
        let flat = |t: &Tensor| t.detach().contiguous()?.flatten_all();
        let (qf, kf, vf, of, gf) = (
            flat(q)?,
            flat(k)?,
            flat(v)?,
            flat(out)?,
            flat(&grad.to_dtype(q.dtype())?)?,
        );
        let flats = (&qf, &kf, &vf, &of, &gf);
        // untracked keys or values (a cross-attention's kept text projections) skip their
        // products: two of the five
        let want = (k.track_op(), v.track_op());
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward::<f32>(flats, dm, want)?,
            DType::F64 => self.backward::<f64>(flats, dm, want)?,
            other => candle_core::bail!("atomtune-attention backward: unsupported dtype {other:?}"),
        };
        Ok((Some(dq), dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::randn;
    use candle_core::Device;

    #[test]
    fn a_backward_without_its_forward_recomputes_the_log_sum_exp() {
        let dm = Dims {
            b: 2,
            h: 2,
            n: 50,
            m: 40,
            d: 4,
            e: 3,
        };
        let Dims { b, h, n, m, d, e } = dm;
        let (q, k, v, g) = (
            randn(&[b, n, h * d], DType::F64),
            randn(&[b, m, h * d], DType::F64),
            randn(&[b, m, h * e], DType::F64),
            randn(&[b, n, h * e], DType::F64),
        );
        let op = |lse| FusedAttention {
            dm,
            scale: 0.7,
            chunk_bytes: CHUNK_BYTES,
            log_sum_exp: Mutex::new(lse),
        };
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (out, lse) = op(None).run(&flat(&q), &flat(&k), &flat(&v), dm);
        let out = Tensor::from_vec(out, (b, n, h * e), &Device::Cpu).unwrap();
        let fl = |x: &Tensor| x.flatten_all().unwrap();
        let args = (&fl(&q), &fl(&k), &fl(&v), &fl(&out), &fl(&g));
        let all = (true, true);
        let kept = op(Some(lse)).backward::<f64>(args, dm, all).unwrap();
        let fresh = op(None).backward::<f64>(args, dm, all).unwrap();
        assert_eq!(flat(&kept.0), flat(&fresh.0));
        for (x, y) in [(&kept.1, &fresh.1), (&kept.2, &fresh.2)] {
            assert_eq!(flat(x.as_ref().unwrap()), flat(y.as_ref().unwrap()));
        }
        // and a wrong statistic would show: the kept one is used
        let off = op(Some(vec![1.0; b * h * n]))
            .backward::<f64>(args, dm, all)
            .unwrap();
        assert_ne!(
            flat(off.2.as_ref().unwrap()),
            flat(fresh.2.as_ref().unwrap())
        );
    }
}
