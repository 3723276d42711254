//! `W' = Wr @ T`: every filter of a weight times a `d x d` matrix (one per input group when `T`
//! is `[g, d, d]`), as one custom op.
//!
//! Built from plain candle ops (`reshape`, `matmul`, `reshape`), this costs little forward but a
//! lot backward: candle's autograd computes the gradient of the frozen weight too (a full-size
//! matmul) and each reshape node allocates a zero tensor to add the incoming gradient into, so
//! for the 589M conv weights of SD 1.5 the backward took 9 s. The op below writes `W'` in one
//! pass on the CPU (gemm for conv layouts) and its backward computes only `dL/dT = Wr^T dL/dW'`.
//! Other devices use the composed form, which is correct everywhere.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout as MemLayout, Shape, Tensor,
};
use rayon::prelude::*;

use crate::{Error, Layout, Result};

/// `W'` with every filter `f` of `w` (shaped like the weight) replaced by `Wr[f] @ T[group(f)]`;
/// `t` is `[d, d]` (one transform for all) or `[g, d, d]` (one per input group).
pub(crate) fn transform_filters(w: &Tensor, t: &Tensor, layout: &Layout) -> Result<Tensor> {
    let d = layout.filter_dim();
    let grouped = t.rank() == 3;
    let want: Vec<usize> = if grouped {
        vec![layout.groups(), d, d]
    } else {
        vec![d, d]
    };
    if t.dims() != want.as_slice()
        || w.dims() != layout.shape().as_slice()
        || w.dtype() != t.dtype()
    {
        return Err(Error::invalid(
            "filter transform",
            format!("{:?} x {:?}", w.dims(), t.dims()),
            format!("expected {layout} and {want:?} of one dtype"),
        ));
    }
    if w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::F64) {
        let op = FilterTransform { layout: *layout };
        return Ok(w.contiguous()?.apply_op2(&t.contiguous()?, op)?);
    }
    composed(w, t, layout)
}

/// The same product from plain candle ops (every device; the reference for the op).
pub(crate) fn composed(w: &Tensor, t: &Tensor, layout: &Layout) -> Result<Tensor> {
    if t.rank() == 3 {
        layout.from_grouped(&layout.to_grouped(w)?.matmul(t)?)
    } else {
        layout.from_filters(&layout.to_filters(w)?.matmul(t)?)
    }
}

struct FilterTransform {
    layout: Layout,
}

/// A raw pointer that threads writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer; a method, so closures capture the `Send` wrapper and not its field.
    fn get(self) -> *mut T {
        self.0
    }
}

trait Float: Copy + Send + Sync + 'static + num_traits::Float {}
impl Float for f32 {}
impl Float for f64 {}

impl FilterTransform {
    fn run<T: Float>(&self, w: &[T], t: &[T], grouped: bool) -> Vec<T> {
        let mut out = vec![T::zero(); w.len()];
        let d = self.layout.filter_dim();
        match self.layout {
            Layout::Conv { co, ci, .. } => {
                let threads = rayon::current_num_threads();
                let par = if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                };
                if !grouped {
                    // SAFETY: `w` and `out` hold `co*ci` rows of `d`, `t` holds `d x d`, all
                    // contiguous row-major.
                    unsafe {
                        gemm_rows(co * ci, d, w.as_ptr(), d, t.as_ptr(), out.as_mut_ptr(), par)
                    };
                } else {
                    // Group i is every row o*ci + i: a [co, d] matrix with row stride ci*d.
                    let dst = SendPtr(out.as_mut_ptr());
                    (0..ci).into_par_iter().for_each(|i| {
                        // SAFETY: group i reads and writes rows o*ci + i only, so the groups'
                        // writes are disjoint; `t` holds `ci` matrices of `d x d`.
                        unsafe {
                            gemm_rows(
                                co,
                                d,
                                w.as_ptr().add(i * d),
                                ci * d,
                                t.as_ptr().add(i * d * d),
                                dst.get().add(i * d),
                                gemm::Parallelism::None,
                            )
                        };
                    });
                }
            }
            Layout::Linear { ci, bo, bi, .. } => {
                // One block row (bo full rows of the weight) per task.
                out.par_chunks_mut(bo * ci)
                    .zip(w.par_chunks(bo * ci))
                    .for_each(|(dst, src)| {
                        let mut x = vec![T::zero(); d];
                        for q in 0..ci / bi {
                            let tq = if grouped {
                                &t[q * d * d..(q + 1) * d * d]
                            } else {
                                t
                            };
                            for a in 0..bo {
                                x[a * bi..(a + 1) * bi]
                                    .copy_from_slice(&src[a * ci + q * bi..a * ci + (q + 1) * bi]);
                            }
                            for a in 0..bo {
                                for b in 0..bi {
                                    let k = a * bi + b;
                                    let mut acc = T::zero();
                                    for (j, &xj) in x.iter().enumerate() {
                                        acc = acc + xj * tq[j * d + k];
                                    }
                                    dst[a * ci + q * bi + b] = acc;
                                }
                            }
                        }
                    });
            }
        }
        out
    }
}

/// `dst[r, :] = lhs[r, :] @ t` for `m` rows of `d`, `lhs` rows `lhs_rs` apart (dst alike), `t`
/// a contiguous `d x d`.
///
/// # Safety
/// The pointers must cover `m` rows at the given strides.
unsafe fn gemm_rows<T: 'static + num_traits::Zero + num_traits::One>(
    m: usize,
    d: usize,
    lhs: *const T,
    lhs_rs: usize,
    t: *const T,
    dst: *mut T,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        d,
        d,
        dst,
        1,
        lhs_rs as isize,
        false,
        lhs,
        1,
        lhs_rs as isize,
        t,
        1,
        d as isize,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

impl CustomOp2 for FilterTransform {
    fn name(&self) -> &'static str {
        "atoms-filter-transform"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &MemLayout,
        s2: &CpuStorage,
        l2: &MemLayout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("atoms-filter-transform needs contiguous inputs");
        };
        let grouped = l2.dims().len() == 3;
        let out = match (s1, s2) {
            (CpuStorage::F32(w), CpuStorage::F32(t)) => {
                CpuStorage::F32(self.run(&w[a1..b1], &t[a2..b2], grouped))
            }
            (CpuStorage::F64(w), CpuStorage::F64(t)) => {
                CpuStorage::F64(self.run(&w[a1..b1], &t[a2..b2], grouped))
            }
            _ => candle_core::bail!("atoms-filter-transform: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    /// `W' = Wr @ T` is linear in `T`: `dL/dT = Wr^T @ dL/dW'` (per group when grouped). The
    /// frozen weight gets no gradient.
    fn bwd(
        &self,
        w: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let l = &self.layout;
        let dt = if t.rank() == 3 {
            let wg = l.to_grouped(w).map_err(candle_core::Error::wrap)?;
            let gg = l.to_grouped(grad).map_err(candle_core::Error::wrap)?;
            wg.transpose(1, 2)?.matmul(&gg)?
        } else {
            let wf = l.to_filters(w).map_err(candle_core::Error::wrap)?;
            let gf = l.to_filters(grad).map_err(candle_core::Error::wrap)?;
            wf.t()?.matmul(&gf)?
        };
        Ok((None, Some(dt)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Block;
    use candle_core::{Device, Var};

    #[test]
    fn the_op_equals_the_composed_form_forward_and_backward() {
        let cases: [(&[usize], Block); 4] = [
            (&[6, 5, 3, 3], Block::default()),
            (&[7, 3, 1, 1], Block::default()),
            (&[4, 3, 3, 2], Block::default()),
            (&[8, 12], Block { rows: 2, cols: 4 }),
        ];
        for dtype in [DType::F32, DType::F64] {
            for (shape, block) in cases {
                let layout = Layout::from_shape(shape, block).unwrap();
                let d = layout.filter_dim();
                let w = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                for grouped in [false, true] {
                    let tdims = if grouped {
                        vec![layout.groups(), d, d]
                    } else {
                        vec![d, d]
                    };
                    let t = Tensor::randn(0f32, 1.0, tdims, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let g = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let v = Var::from_tensor(&t).unwrap();
                    let fast = transform_filters(&w, v.as_tensor(), &layout).unwrap();
                    let slow = composed(&w, v.as_tensor(), &layout).unwrap();
                    let diff = |a: &Tensor, b: &Tensor| {
                        let e = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                        e.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
                    };
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert!(
                        diff(&fast, &slow) < tol,
                        "{layout} grouped={grouped} {dtype:?}"
                    );
                    let gf = (fast * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (slow * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let (gf, gs) = (gf.get(&v).unwrap(), gs.get(&v).unwrap());
                    assert!(
                        diff(gf, gs) < tol * 10.0,
                        "{layout} grouped={grouped} {dtype:?}: dT"
                    );
                }
            }
        }
    }
}
