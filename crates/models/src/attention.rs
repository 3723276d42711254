//! Softmax attention as one op that never holds a whole score matrix: queries are processed in
//! row chunks (`S = scale Q_c K^T`, softmax, `P V`) and the backward pass recomputes each chunk's
//! probabilities instead of keeping them (the idea of FlashAttention, Dao et al. 2022,
//! arXiv 2205.14135, without its GPU tiling).
//!
//! At 64x64 latents the first UNet blocks attend over 4096 positions: the composed form keeps
//! every `heads x 4096 x 4096` score matrix and its softmax intermediates for backward, 18 GB
//! for the tiny fixture. This op's memory is a chunk per thread forward and a chunk of the batch
//! backward, plus one number per query row: the row's log-sum-exp `l = max + ln(sum e^(s - max))`,
//! which the forward keeps so that the backward forms `P = e^(S - l)` in one pass over the
//! scores. The forward normalises the `P V` rows (`e` numbers each), not the scores (`m`).
//! The CPU forward runs on gemm; other devices use the composed form ([`attention_slow`]),
//! which is also the reference the tests hold this op to.
//!
//! Backward, per chunk of query rows, with `P = softmax(scale Q K^T)`, `O = P V` and output
//! gradient `G`: `dV += P^T G`, `dP = G V^T`, `dS = scale P * (dP - rowsum(G * O))`,
//! `dQ = dS K`, `dK += dS^T Q`.

use std::sync::Mutex;

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::Result;

/// Bytes of scores a task holds at once (forward and backward: twice that).
const CHUNK_BYTES: usize = 1 << 20;

/// `softmax(scale q k^T) v` from plain candle ops: every device, and the reference.
///
/// # Shapes
/// `q [b, n, d]`, `k [b, m, d]`, `v [b, m, e]` -> `[b, n, e]`.
pub fn attention_slow(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v)?)
}

/// The same as [`attention_slow`], chunked, with a recomputing backward on the CPU (f32, f64).
pub fn attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let fused = q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64);
    if !fused || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return attention_slow(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = FusedAttention {
        scale,
        log_sum_exp: Mutex::new(None),
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

struct FusedAttention {
    scale: f64,
    /// Each query row's log-sum-exp of its scaled scores, `[b * n]`, left by the forward for the
    /// backward (the op lives in the graph node it made, so one forward pairs with its backward).
    log_sum_exp: Mutex<Option<Vec<f64>>>,
}

trait Float: num_traits::Float + num_traits::Zero + num_traits::One + Send + Sync + 'static {
    fn from_f64(x: f64) -> Self;

    /// On each row of `m` numbers: `x <- e^(x - max)`, and the row's `max` and `sum` of those.
    fn exp_rows(x: &mut [Self], m: usize, max: &mut [Self], sum: &mut [Self]);

    /// On each row `i` of `m` numbers: `x <- e^(x - shift[i])`, where `shift[i]` is at least
    /// the row's maximum.
    fn exp_rows_shifted(x: &mut [Self], m: usize, shift: &[Self]);
}

impl Float for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }

    fn exp_rows(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { exp_rows_f32_avx512(x, m, max, sum) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { exp_rows_f32_avx2(x, m, max, sum) };
            }
        }
        exp_rows_f32(x, m, max, sum)
    }

    fn exp_rows_shifted(x: &mut [f32], m: usize, shift: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { exp_rows_shifted_f32_avx512(x, m, shift) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { exp_rows_shifted_f32_avx2(x, m, shift) };
            }
        }
        exp_rows_shifted_f32(x, m, shift)
    }
}

impl Float for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }

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

/// `e^x` for `x <= 0` in f32, vectorisable: Cody-Waite range reduction to `r` in
/// `[-ln2/2, ln2/2]`, Cephes' degree-6 polynomial for `e^r`, and `2^n` through the exponent bits.
/// Relative error about 1e-7, like `expf`; inputs below -87 give about 1e-38 (softmax weights
/// that small are zero in any sum).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n for n in [-126, 0]: n + 127 lands in the low mantissa bits of 2^23 + 127 + n, and
    // shifting those into the exponent field gives 2^n. (`n as i32` would scalarise: Rust's
    // float-to-int cast saturates, which has no vector instruction.)
    let biased = (n + 8_388_735.0).to_bits(); // 2^23 + 127 + n
    e * f32::from_bits(biased << 23)
}

/// Lanes of the f32 row loops, written so they vectorise: 16 partial maxima and sums.
const LANES: usize = 16;

/// [`Float::exp_rows`] for f32.
#[inline(always)]
fn exp_rows_f32(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
    for ((row, mx), sm) in x.chunks_exact_mut(m).zip(max).zip(sum) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        *mx = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        let shift = *mx;
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp_f32(*v - shift);
                *s += *v;
            }
        }
        *sm = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_f32(*v - shift);
            *sm += *v;
        }
    }
}

/// [`Float::exp_rows_shifted`] for f32.
#[inline(always)]
fn exp_rows_shifted_f32(x: &mut [f32], m: usize, shift: &[f32]) {
    for (row, &sh) in x.chunks_exact_mut(m).zip(shift) {
        for v in row.iter_mut() {
            *v = exp_f32(*v - sh);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_rows_f32_avx512(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
    exp_rows_f32(x, m, max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_f32_avx2(x: &mut [f32], m: usize, max: &mut [f32], sum: &mut [f32]) {
    exp_rows_f32(x, m, max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_rows_shifted_f32_avx512(x: &mut [f32], m: usize, shift: &[f32]) {
    exp_rows_shifted_f32(x, m, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_shifted_f32_avx2(x: &mut [f32], m: usize, shift: &[f32]) {
    exp_rows_shifted_f32(x, m, shift)
}

/// A row-major matrix view for [`gemm`]: `data`, and whether to read it transposed.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    /// `(rows, cols, column stride, row stride)` as seen.
    fn view(&self) -> (usize, usize, isize, isize) {
        if self.transposed {
            (self.cols, self.rows, self.cols as isize, 1)
        } else {
            (self.rows, self.cols, 1, self.cols as isize)
        }
    }
}

/// `dst [m, n] (+)= scale a @ b`, single-threaded (callers parallelise over heads).
fn gemm<T: Float>(dst: &mut [T], a: Mat<'_, T>, b: Mat<'_, T>, scale: T, accumulate: bool) {
    let (m, k, a_cs, a_rs) = a.view();
    let (k2, n, b_cs, b_rs) = b.view();
    assert!(k == k2 && dst.len() >= m * n && a.data.len() >= m * k && b.data.len() >= k * n);
    // SAFETY: the assert above checks every matrix lies within its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Query rows per chunk so a chunk's `rows x m` scores take about `CHUNK_BYTES`.
fn chunk_rows<T>(n: usize, m: usize) -> usize {
    (CHUNK_BYTES / (std::mem::size_of::<T>() * m.max(1))).clamp(1, n.max(1))
}

impl FusedAttention {
    /// Forward: `out [b, n, e]` and each query row's log-sum-exp `[b * n]`, one task per
    /// (batch row, chunk of queries).
    fn run<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, n, m, d, e): (usize, usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<f64>) {
        let mut out = vec![T::zero(); b * n * e];
        let mut lse = vec![0f64; b * n];
        let chunk = chunk_rows::<T>(n, m);
        let scale = T::from_f64(self.scale);
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..n).step_by(chunk).map(move |s| (bi, s)))
            .collect();
        let (out_ptr, lse_ptr) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
        tasks.par_iter().for_each(|&(bi, s)| {
            let c = chunk.min(n - s);
            let mut p = vec![T::zero(); c * m];
            let (mut max, mut sum) = (vec![T::zero(); c], vec![T::zero(); c]);
            let qc = Mat::new(&q[(bi * n + s) * d..(bi * n + s + c) * d], c, d);
            let kb = Mat::new(&k[bi * m * d..(bi + 1) * m * d], m, d);
            let vb = Mat::new(&v[bi * m * e..(bi + 1) * m * e], m, e);
            gemm(&mut p, qc, kb.t(), scale, false);
            T::exp_rows(&mut p, m, &mut max, &mut sum);
            // SAFETY: each task writes its own rows [(bi * n + s) .. + c) of both outputs.
            let (dst, lse) = unsafe {
                (
                    std::slice::from_raw_parts_mut(out_ptr.get().add((bi * n + s) * e), c * e),
                    std::slice::from_raw_parts_mut(lse_ptr.get().add(bi * n + s), c),
                )
            };
            gemm(dst, Mat::new(&p, c, m), vb, T::one(), false);
            for (i, row) in dst.chunks_exact_mut(e).enumerate() {
                let inv = T::one() / sum[i];
                row.iter_mut().for_each(|x| *x = *x * inv);
                lse[i] = (max[i] + sum[i].ln()).to_f64().unwrap_or(f64::NAN);
            }
        });
        (out, lse)
    }

    /// Backward: `(dq, dk, dv)`, one task per batch row (it owns that row's `dk`, `dv`), query
    /// chunks in turn; the probabilities are recomputed from the forward's log-sum-exp `lse`.
    #[allow(clippy::type_complexity)]
    fn grads<T: Float>(
        &self,
        (q, k, v, o, g): (&[T], &[T], &[T], &[T], &[T]),
        lse: &[f64],
        (b, n, m, d, e): (usize, usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); b * n * d],
            vec![T::zero(); b * m * d],
            vec![T::zero(); b * m * e],
        );
        let chunk = chunk_rows::<T>(n, m);
        let scale = T::from_f64(self.scale);
        let lse: Vec<T> = lse.iter().map(|&x| T::from_f64(x)).collect();
        dq.par_chunks_mut(n * d)
            .zip(dk.par_chunks_mut(m * d))
            .zip(dv.par_chunks_mut(m * e))
            .enumerate()
            .for_each(|(bi, ((dqb, dkb), dvb))| {
                let kb = Mat::new(&k[bi * m * d..(bi + 1) * m * d], m, d);
                let vb = Mat::new(&v[bi * m * e..(bi + 1) * m * e], m, e);
                let mut p = vec![T::zero(); chunk * m];
                let mut ds = vec![T::zero(); chunk * m];
                for s in (0..n).step_by(chunk) {
                    let c = chunk.min(n - s);
                    let rows = |w: usize| (bi * n + s) * w..(bi * n + s + c) * w;
                    let qc = Mat::new(&q[rows(d)], c, d);
                    let gc = Mat::new(&g[rows(e)], c, e);
                    let oc = &o[rows(e)];
                    let (p, ds) = (&mut p[..c * m], &mut ds[..c * m]);
                    gemm(p, qc, kb.t(), scale, false);
                    T::exp_rows_shifted(p, m, &lse[rows(1)]);
                    // dV += P^T G
                    gemm(dvb, Mat::new(p, c, m).t(), gc, T::one(), true);
                    // dP = G V^T, then dS = scale P (dP - rowsum(G O))
                    gemm(ds, gc, vb.t(), T::one(), false);
                    for i in 0..c {
                        let mut rowsum = T::zero();
                        for j in 0..e {
                            rowsum = rowsum + gc.data[i * e + j] * oc[i * e + j];
                        }
                        for j in 0..m {
                            let x = i * m + j;
                            ds[x] = scale * p[x] * (ds[x] - rowsum);
                        }
                    }
                    // dQ = dS K; dK += dS^T Q
                    let dqc = &mut dqb[s * d..(s + c) * d];
                    gemm(dqc, Mat::new(ds, c, m), kb, T::one(), false);
                    gemm(dkb, Mat::new(ds, c, m).t(), qc, T::one(), true);
                }
            });
        (dq, dk, dv)
    }
}

impl FusedAttention {
    /// [`CustomOp3::bwd`] on flat CPU tensors `(q, k, v, out, grad)` of dtype `T`.
    #[allow(clippy::type_complexity)]
    fn backward<T: Float + candle_core::WithDType>(
        &self,
        (q, k, v, o, g): (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
        dims: (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, n, m, d, e) = dims;
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
        let lse = kept.unwrap_or_else(|| self.run(&q, &k, &v, dims).1);
        let (dq, dk, dv) = self.grads((&q, &k, &v, &o, &g), &lse, dims);
        let dev = &candle_core::Device::Cpu;
        Ok((
            Tensor::from_vec(dq, (b, n, d), dev)?,
            Tensor::from_vec(dk, (b, m, d), dev)?,
            Tensor::from_vec(dv, (b, m, e), dev)?,
        ))
    }
}

/// A raw pointer that tasks writing disjoint rows may share.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
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
        let (Some((a1, z1)), Some((a2, z2)), Some((a3, z3))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("atomtune-attention needs contiguous inputs");
        };
        let (b, n, d) = l1.shape().dims3()?;
        let (b2, m, d2) = l2.shape().dims3()?;
        let (b3, m3, e) = l3.shape().dims3()?;
        if b2 != b || b3 != b || d2 != d || m3 != m {
            candle_core::bail!(
                "atomtune-attention: shapes q {:?} k {:?} v {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let dims = (b, n, m, d, e);
        let (out, lse) = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (o, lse) = self.run(&q[a1..z1], &k[a2..z2], &v[a3..z3], dims);
                (CpuStorage::F32(o), lse)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (o, lse) = self.run(&q[a1..z1], &k[a2..z2], &v[a3..z3], dims);
                (CpuStorage::F64(o), lse)
            }
            _ => candle_core::bail!("atomtune-attention: unsupported dtype {:?}", s1.dtype()),
        };
        *self.log_sum_exp.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, Shape::from((b, n, e))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = q.dims3()?;
        let (m, e) = (k.dim(1)?, v.dim(2)?);
        let dims = (b, n, m, d, e);
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
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward::<f32>(flats, dims)?,
            DType::F64 => self.backward::<f64>(flats, dims)?,
            other => candle_core::bail!("atomtune-attention backward: unsupported dtype {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_rel as rel;
    use candle_core::{Device, Var};

    #[test]
    fn the_fast_exp_is_as_accurate_as_expf() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37);
    }

    #[test]
    fn the_fused_op_equals_the_composed_form_forward_and_backward() {
        // shapes of self-attention (long) and cross-attention (77 keys), and a ragged chunking;
        // the usual scale and a large one (rows near one-hot, exponents far below zero)
        let cases = [
            (3, 300, 300, 4, 4, 0.5),
            (2, 1000, 77, 8, 8, 0.35),
            (1, 7, 5, 3, 2, 0.58),
        ];
        let peaky = [(2, 300, 300, 4, 4, 12.0)];
        for (b, n, m, d, e, scale) in cases.into_iter().chain(peaky) {
            for dtype in [DType::F32, DType::F64] {
                let r = |shape: (usize, usize, usize)| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (q, k, v) = (r((b, n, d)), r((b, m, d)), r((b, m, e)));
                let w = Tensor::randn(0f32, 1.0, (b, n, e), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let fast = attention_fused(&q, &k, &v, scale).unwrap();
                let slow = attention_slow(&q, &k, &v, scale).unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(
                    rel(&fast, &slow) < tol,
                    "{dtype:?} {:?}: forward {}",
                    (b, n, m),
                    rel(&fast, &slow)
                );
                let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let e = rel(gf.get(x).unwrap(), gs.get(x).unwrap());
                    assert!(e < tol * 20.0, "{dtype:?} {:?}: d{name} {e}", (b, n, m));
                }
            }
        }
    }

    #[test]
    fn a_backward_without_its_forward_recomputes_the_log_sum_exp() {
        let dims @ (b, n, m, d, e) = (2, 50, 40, 4, 3);
        let t = |len: usize, shape: (usize, usize, usize)| {
            Tensor::randn(0f64, 1.0, len, &Device::Cpu)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        let (q, k, v, g) = (
            t(b * n * d, (b, n, d)),
            t(b * m * d, (b, m, d)),
            t(b * m * e, (b, m, e)),
            t(b * n * e, (b, n, e)),
        );
        let op = |lse| FusedAttention {
            scale: 0.7,
            log_sum_exp: Mutex::new(lse),
        };
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (out, lse) = op(None).run(&flat(&q), &flat(&k), &flat(&v), dims);
        let out = Tensor::from_vec(out, (b, n, e), &Device::Cpu).unwrap();
        let fl = |x: &Tensor| x.flatten_all().unwrap();
        let args = (&fl(&q), &fl(&k), &fl(&v), &fl(&out), &fl(&g));
        let kept = op(Some(lse)).backward::<f64>(args, dims).unwrap();
        let fresh = op(None).backward::<f64>(args, dims).unwrap();
        for (x, y) in [
            (&kept.0, &fresh.0),
            (&kept.1, &fresh.1),
            (&kept.2, &fresh.2),
        ] {
            assert_eq!(flat(x), flat(y));
        }
        // and a wrong statistic would show: the kept one is used
        let off = op(Some(vec![1.0; b * n]))
            .backward::<f64>(args, dims)
            .unwrap();
        assert_ne!(flat(&off.2), flat(&fresh.2));
    }
}
