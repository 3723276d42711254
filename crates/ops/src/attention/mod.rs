//! Softmax attention `softmax(scale q k^T) v` per head, as one op that never holds a whole score
//! matrix: queries are processed in chunks of rows, and the backward recomputes each chunk's
//! probabilities from one number per query row kept by the forward, its log-sum-exp.
//!
//! At 64x64 latents the first UNet blocks attend over 4096 positions: the composed form
//! ([`attention_slow`]) keeps every `heads x 4096 x 4096` score matrix and its softmax
//! intermediates for the backward, 18 GB for the tiny fixture. [`attention`] picks the fused
//! CPU kernel (`fused.rs`) or the portable chunked form (`portable.rs`, every device); both are
//! held to [`attention_slow`] by the tests.
//!
//! Backward, per chunk of query rows, with `P = softmax(scale Q K^T)`, `O = P V` and output
//! gradient `G`: `dV += P^T G`, `dP = G V^T`, `dS = scale P * (dP - rowsum(G * O))`,
//! `dQ = dS K`, `dK += dS^T Q`.

use candle_core::{Tensor, D};

use crate::kernels;
use crate::Result;

mod bf16;
mod fused;
mod portable;

/// The problem: batch `b`, `h` heads, `n` queries, `m` keys, head sizes `d` (queries and keys)
/// and `e` (values). Every tensor keeps its heads side by side: `q [b, n, h d]`, `k [b, m, h d]`,
/// `v [b, m, h e]`, `out [b, n, h e]`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    n: usize,
    m: usize,
    d: usize,
    e: usize,
}

impl Dims {
    /// The problem `q`, `k`, `v` pose with `h` heads, or why they do not fit together.
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, h: usize) -> Result<Dims> {
        let (q, k, v) = (q.dims(), k.dims(), v.dims());
        let fits = q.len() == 3 && k.len() == 3 && v.len() == 3 && h > 0;
        if !fits || k[0] != q[0] || v[0] != q[0] || k[1] != v[1] || k[2] != q[2] {
            candle_core::bail!("attention: shapes q {q:?} k {k:?} v {v:?} do not fit")
        }
        if q[2] % h != 0 || v[2] % h != 0 {
            candle_core::bail!("attention: widths q {q:?} v {v:?} are not {h} heads")
        }
        Ok(Dims {
            b: q[0],
            h,
            n: q[1],
            m: k[1],
            d: q[2] / h,
            e: v[2] / h,
        })
    }
}

/// `softmax(scale q k^T) v` per head, differentiable in `q`, `k` and `v`, in their dtype.
///
/// # Shapes
/// Heads side by side: `q [b, n, heads * d]`, `k [b, m, heads * d]`, `v [b, m, heads * e]`
/// -> `[b, n, heads * e]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let chunk = if kernels::fused(&[q, k, v])? {
        fused::CHUNK_BYTES
    } else {
        portable::CHUNK_BYTES
    };
    attention_chunked(q, k, v, heads, scale, chunk)
}

/// [`attention`] with score chunks of about `chunk_bytes` (the `attention` bench compares sizes;
/// the tests use small ones to cut queries into many chunks).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let dm = Dims::of(q, k, v, heads)?;
    if kernels::fused(&[q, k, v])? {
        fused::attention((q, k, v), dm, scale, chunk_bytes)
    } else {
        portable::attention((q, k, v), dm, scale, chunk_bytes)
    }
}

/// The same from plain candle ops and candle's autograd: the reference, which keeps every score
/// matrix.
pub fn attention_slow(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .reshape((b * heads, n, c / heads))
    };
    let scores = (split(q)?.matmul(&split(k)?.t()?)? * scale)?;
    let o = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&split(v)?)?;
    let (bh, n, e) = o.dims3()?;
    o.reshape((bh / heads, heads, n, e))?
        .transpose(1, 2)?
        .reshape((bh / heads, n, heads * e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_rel as rel, randn, weighted_grads};
    use crate::Kernels;
    use candle_core::{DType, Var};

    #[test]
    fn the_reference_attends_each_head_on_its_own() {
        let (b, h, n, m, d, e) = (2, 3, 9, 7, 4, 5);
        let (q, k, v) = (
            randn(&[b, n, h * d], DType::F64),
            randn(&[b, m, h * d], DType::F64),
            randn(&[b, m, h * e], DType::F64),
        );
        let all = attention_slow(&q, &k, &v, h, 0.4).unwrap();
        for hi in 0..h {
            let one = attention_slow(
                &q.narrow(2, hi * d, d).unwrap(),
                &k.narrow(2, hi * d, d).unwrap(),
                &v.narrow(2, hi * e, e).unwrap(),
                1,
                0.4,
            )
            .unwrap();
            assert!(rel(&all.narrow(2, hi * e, e).unwrap(), &one) < 1e-14);
        }
    }

    /// Both implementations against the composed form, forward and every gradient: shapes of
    /// self-attention (long) and cross-attention (77 keys); one head and several; the usual
    /// scale and a large one (rows near one-hot, exponents far below zero); and queries cut into
    /// several chunks, the last one short, by each implementation's default chunk size or by a
    /// small one.
    #[test]
    fn each_kernel_equals_the_composed_form_forward_and_backward() {
        let cases = [
            (3, 1, 300, 300, 4, 4, 0.5, None),
            (2, 2, 1000, 77, 8, 8, 0.35, None),
            (1, 3, 7, 5, 3, 2, 0.58, None),
            (2, 4, 300, 300, 4, 4, 12.0, None),
            (1, 2, 2000, 300, 2, 2, 0.5, None),
            (2, 3, 203, 50, 4, 3, 0.5, Some(3 * 2 * 3 * 50 * 8 + 5)),
        ];
        // The fifth case chunks raggedly in the fused op at its default size, the sixth in
        // both implementations at its own size.
        for rows in [
            fused::chunk_rows::<f32>(2000, 300, fused::CHUNK_BYTES),
            fused::chunk_rows::<f64>(2000, 300, fused::CHUNK_BYTES),
            fused::chunk_rows::<f64>(203, 50, 3 * 2 * 3 * 50 * 8 + 5),
        ] {
            assert!(rows < 2000 && 2000 % rows != 0 && 203 % rows != 0);
        }
        let dm = Dims::of(
            &randn(&[2, 203, 12], DType::F32),
            &randn(&[2, 50, 12], DType::F32),
            &randn(&[2, 50, 9], DType::F32),
            3,
        )
        .unwrap();
        let rows = portable::chunk_rows(dm, 3 * 2 * 3 * 50 * 8 + 5);
        assert!(rows < 203 && 203 % rows != 0, "{rows}");
        for kernels in Kernels::ALL {
            for (b, h, n, m, d, e, scale, chunk) in cases {
                for dtype in [DType::F32, DType::F64] {
                    let r = |shape: &[usize]| Var::from_tensor(&randn(shape, dtype)).unwrap();
                    let (q, k, v) = (r(&[b, n, h * d]), r(&[b, m, h * d]), r(&[b, m, h * e]));
                    let fast = kernels.scope(|| match chunk {
                        Some(c) => attention_chunked(&q, &k, &v, h, scale, c).unwrap(),
                        None => attention(&q, &k, &v, h, scale).unwrap(),
                    });
                    let slow = attention_slow(&q, &k, &v, h, scale).unwrap();
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    let case = (kernels, b, h, n, m, chunk);
                    let err = rel(&fast, &slow);
                    assert!(err < tol, "{dtype:?} {case:?}: forward {err}");
                    let (gf, gs) = kernels.scope(|| weighted_grads(&fast, &slow));
                    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                        let err = rel(gf.get(x).unwrap(), gs.get(x).unwrap());
                        assert!(err < tol * 20.0, "{dtype:?} {case:?}: d{name} {err}");
                    }
                }
            }
        }
    }

    /// The portable form in half precision (what a GPU runs with f16 or bf16 weights when
    /// attention is not upcast): softmax in f32, products in the inputs' dtype, within that
    /// dtype's rounding of the f32 result.
    #[test]
    fn the_portable_form_keeps_half_precision_inputs_close_to_f32() {
        let (b, h, n, m, d) = (1, 2, 64, 40, 8);
        let r = |shape: &[usize]| Var::from_tensor(&randn(shape, DType::F32)).unwrap();
        let (q, k, v) = (r(&[b, n, h * d]), r(&[b, m, h * d]), r(&[b, m, h * d]));
        let slow = attention_slow(&q, &k, &v, h, 0.35).unwrap();
        for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let half = |x: &Var| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let (qh, kh, vh) = (half(&q), half(&k), half(&v));
            let fast = attention(&qh, &kh, &vh, h, 0.35).unwrap();
            assert_eq!(fast.dtype(), dtype);
            let err = rel(&fast.to_dtype(DType::F32).unwrap(), &slow);
            assert!(err < tol, "{dtype:?} forward {err}");
            let m = randn(slow.dims(), DType::F32);
            let g = (fast.to_dtype(DType::F32).unwrap() * &m)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs = (slow.clone() * &m)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x, xh) in [("q", &q, &qh), ("k", &k, &kh), ("v", &v, &vh)] {
                let got = g.get(xh).unwrap().to_dtype(DType::F32).unwrap();
                let err = rel(&got, gs.get(x).unwrap());
                assert!(err < tol * 4.0, "{dtype:?} d{name} {err}");
            }
        }
    }
}
