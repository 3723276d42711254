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

/// Bytes of scores a forward task holds at once.
const CHUNK_BYTES: usize = 2 << 20;
/// Bytes of one backward chunk tensor (the batch of heads at once).
const BWD_CHUNK_BYTES: usize = 64 << 20;

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
}
impl Float for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl Float for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// `dst [m, n] = a [m, k] @ b^T` (`b` is `[n, k]`), or `a @ b` (`b` is `[k, n]`), all row-major.
///
/// # Safety
/// The slices must hold the matrices of the sizes given.
unsafe fn gemm<T: Float>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
) {
    let (rhs_cs, rhs_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        false,
        a.as_ptr(),
        1,
        k as isize,
        b.as_ptr(),
        rhs_cs,
        rhs_rs,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl FusedAttention {
    fn run<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, n, m, d, e): (usize, usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::zero(); b * n * e];
        let chunk = (CHUNK_BYTES / (std::mem::size_of::<T>() * m.max(1))).clamp(1, n.max(1));
        let scale = T::from_f64(self.scale);
        // one task per (batch row, chunk of queries): contiguous rows of the output
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..n).step_by(chunk).map(move |s| (bi, s)))
            .collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        tasks.par_iter().for_each(|&(bi, s)| {
            let c = chunk.min(n - s);
            let mut scores = vec![T::zero(); c * m];
            let qc = &q[(bi * n + s) * d..(bi * n + s + c) * d];
            let kb = &k[bi * m * d..(bi + 1) * m * d];
            let vb = &v[bi * m * e..(bi + 1) * m * e];
            // SAFETY: sizes as declared; scores is c x m.
            unsafe { gemm(&mut scores, qc, kb, c, m, d, true) };
            for row in scores.chunks_exact_mut(m) {
                let mut max = T::neg_infinity();
                for x in row.iter_mut() {
                    *x = *x * scale;
                    max = max.max(*x);
                }
                let mut sum = T::zero();
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum = sum + *x;
                }
                let inv = T::one() / sum;
                for x in row.iter_mut() {
                    *x = *x * inv;
                }
            }
            let out_ptr = out_ptr;
            // SAFETY: each task writes its own rows [(bi * n + s) .. + c) of the output.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add((bi * n + s) * e), c * e)
            };
            unsafe { gemm(dst, &scores, vb, c, e, m, false) };
        });
        out
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
        let (q, k, v, o, g) = (
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            grad.detach(),
        );
        let (b, n, _) = q.dims3()?;
        let m = k.dim(1)?;
        let chunk =
            (BWD_CHUNK_BYTES / (q.dtype().size_in_bytes() * b * m.max(1))).clamp(1, n.max(1));
        let kt = k.t()?;
        let vt = v.t()?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for s in (0..n).step_by(chunk) {
            let c = chunk.min(n - s);
            let (qc, gc, oc) = (q.narrow(1, s, c)?, g.narrow(1, s, c)?, o.narrow(1, s, c)?);
            let p = candle_nn::ops::softmax(&(qc.matmul(&kt)? * self.scale)?, D::Minus1)?;
            dv = (dv + p.t()?.matmul(&gc)?)?;
            let dp = gc.matmul(&vt)?;
            let rowsum = (&gc * &oc)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&rowsum)?)? * self.scale)?;
            dq.push(ds.matmul(&k)?);
            dk = (dk + ds.t()?.matmul(&qc)?)?;
        }
        Ok((Some(Tensor::cat(&dq, 1)?), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        d / s
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
