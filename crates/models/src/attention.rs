//! Softmax attention as one op that never holds a whole score matrix: queries are processed in
//! row chunks (`S = Q_c K^T`, softmax, `P V`) and the backward pass recomputes each chunk's
//! probabilities instead of keeping them (the idea of FlashAttention, Dao et al. 2022,
//! arXiv 2205.14135, without its GPU tiling).
//!
//! At 64x64 latents the first UNet blocks attend over 4096 positions: the composed form keeps
//! every `heads x 4096 x 4096` score matrix and its softmax intermediates for backward, 18 GB
//! for the tiny fixture. This op's memory is a chunk per thread forward and a chunk of the batch
//! backward. The CPU forward runs on gemm; other devices use the composed form
//! ([`attention_slow`]), which is also the reference the tests hold this op to.
//!
//! Backward, per chunk of query rows, with `P = softmax(scale Q K^T)`, `O = P V` and output
//! gradient `G`: `dV += P^T G`, `dP = G V^T`, `dS = scale P * (dP - rowsum(G * O))`,
//! `dQ = dS K`, `dK += dS^T Q`.

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
    Ok(q.apply_op3(&k, &v, FusedAttention { scale })?)
}

struct FusedAttention {
    scale: f64,
}

trait Float: num_traits::Float + num_traits::Zero + num_traits::One + Send + Sync + 'static {
    fn from_f64(x: f64) -> Self;

    /// `x <- softmax(scale x)` on each row of `m` numbers.
    fn softmax_rows(x: &mut [Self], m: usize, scale: Self);
}

impl Float for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }

    fn softmax_rows(x: &mut [f32], m: usize, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { softmax_f32_avx512(x, m, scale) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { softmax_f32_avx2(x, m, scale) };
            }
        }
        softmax_f32(x, m, scale)
    }
}

impl Float for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }

    fn softmax_rows(x: &mut [f64], m: usize, scale: f64) {
        for row in x.chunks_exact_mut(m) {
            let mut max = f64::NEG_INFINITY;
            for v in row.iter_mut() {
                *v *= scale;
                max = max.max(*v);
            }
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
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
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// The f32 softmax, written so it vectorises: 16 lanes of partial maxima and sums.
#[inline(always)]
fn softmax_f32(x: &mut [f32], m: usize, scale: f32) {
    const L: usize = 16;
    for row in x.chunks_exact_mut(m) {
        let mut lanes = [f32::NEG_INFINITY; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v *= scale;
                *l = if *v > *l { *v } else { *l };
            }
        }
        let mut max = lanes
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for v in chunks.into_remainder() {
            *v *= scale;
            max = if *v > max { *v } else { max };
        }
        let mut sums = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp_f32(*v - max);
                *s += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_f32(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_f32_avx512(x: &mut [f32], m: usize, scale: f32) {
    softmax_f32(x, m, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_f32_avx2(x: &mut [f32], m: usize, scale: f32) {
    softmax_f32(x, m, scale)
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

/// `dst [m, n] (+)= a @ b`, single-threaded (callers parallelise over heads).
fn gemm<T: Float>(dst: &mut [T], a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool) {
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
            T::one(),
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
    /// Forward: `out [b, n, e]`, one task per (batch row, chunk of queries).
    fn run<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, n, m, d, e): (usize, usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::zero(); b * n * e];
        let chunk = chunk_rows::<T>(n, m);
        let scale = T::from_f64(self.scale);
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..n).step_by(chunk).map(move |s| (bi, s)))
            .collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        tasks.par_iter().for_each(|&(bi, s)| {
            let c = chunk.min(n - s);
            let mut p = vec![T::zero(); c * m];
            let qc = Mat::new(&q[(bi * n + s) * d..(bi * n + s + c) * d], c, d);
            let kb = Mat::new(&k[bi * m * d..(bi + 1) * m * d], m, d);
            let vb = Mat::new(&v[bi * m * e..(bi + 1) * m * e], m, e);
            gemm(&mut p, qc, kb.t(), false);
            T::softmax_rows(&mut p, m, scale);
            // SAFETY: each task writes its own rows [(bi * n + s) .. + c) of the output.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add((bi * n + s) * e), c * e)
            };
            gemm(dst, Mat::new(&p, c, m), vb, false);
        });
        out
    }

    /// Backward: `(dq, dk, dv)`, one task per batch row (it owns that row's `dk`, `dv`), query
    /// chunks in turn; the probabilities are recomputed, never stored.
    #[allow(clippy::type_complexity)]
    fn grads<T: Float>(
        &self,
        (q, k, v, o, g): (&[T], &[T], &[T], &[T], &[T]),
        (b, n, m, d, e): (usize, usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); b * n * d],
            vec![T::zero(); b * m * d],
            vec![T::zero(); b * m * e],
        );
        let chunk = chunk_rows::<T>(n, m);
        let scale = T::from_f64(self.scale);
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
                    gemm(p, qc, kb.t(), false);
                    T::softmax_rows(p, m, scale);
                    // dV += P^T G
                    gemm(dvb, Mat::new(p, c, m).t(), gc, true);
                    // dP = G V^T, then dS = scale P (dP - rowsum(G O))
                    gemm(ds, gc, vb.t(), false);
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
                    gemm(&mut dqb[s * d..(s + c) * d], Mat::new(ds, c, m), kb, false);
                    gemm(dkb, Mat::new(ds, c, m).t(), qc, true);
                }
            });
        (dq, dk, dv)
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
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(&q[a1..z1], &k[a2..z2], &v[a3..z3], dims))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.run(&q[a1..z1], &k[a2..z2], &v[a3..z3], dims))
            }
            _ => candle_core::bail!("atomtune-attention: unsupported dtype {:?}", s1.dtype()),
        };
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
        let dev = q.device();
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => {
                let (a, bb, c, dd, ee) = (
                    qf.to_vec1::<f32>()?,
                    kf.to_vec1()?,
                    vf.to_vec1()?,
                    of.to_vec1()?,
                    gf.to_vec1()?,
                );
                let (x, y, z) = self.grads((&a, &bb, &c, &dd, &ee), dims);
                (
                    Tensor::from_vec(x, (b, n, d), dev)?,
                    Tensor::from_vec(y, (b, m, d), dev)?,
                    Tensor::from_vec(z, (b, m, e), dev)?,
                )
            }
            DType::F64 => {
                let (a, bb, c, dd, ee) = (
                    qf.to_vec1::<f64>()?,
                    kf.to_vec1()?,
                    vf.to_vec1()?,
                    of.to_vec1()?,
                    gf.to_vec1()?,
                );
                let (x, y, z) = self.grads((&a, &bb, &c, &dd, &ee), dims);
                (
                    Tensor::from_vec(x, (b, n, d), dev)?,
                    Tensor::from_vec(y, (b, m, d), dev)?,
                    Tensor::from_vec(z, (b, m, e), dev)?,
                )
            }
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
        // shapes of self-attention (long) and cross-attention (77 keys), and a ragged chunking
        for (b, n, m, d, e) in [(3, 300, 300, 4, 4), (2, 1000, 77, 8, 8), (1, 7, 5, 3, 2)] {
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
                let scale = 1.0 / (d as f64).sqrt();
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
}
