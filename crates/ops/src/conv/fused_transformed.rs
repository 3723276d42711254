//! The fused CPU convolution with the kernel `W' = Wr T` of an atoms adapter, computed without
//! ever building `W'`.
//!
//! Each output is `y[o, p] = sum_{c, j} W[o, c, j] sum_k T[j, k] cols[c, k, p]`: the `d x d`
//! transform `T` moves from the `o c` filters onto the `c` column blocks of the input's im2col
//! matrix. So:
//!
//! - forward: `cols'_c = T cols_c` for every input channel while the columns are formed, then
//!   the frozen weight's one gemm `y = W cols'` (or, when the kernel holds fewer numbers than
//!   the columns, the plain conv with `W'` formed as a temporary);
//! - backward: `dcols' = W^T dy` (one gemm, the size of the forward), from which come both
//!   `dL/dT = sum_c dcols'_c cols_c^T` and, when the input is tracked,
//!   `dx = col2im(T^T dcols')`.
//!
//! Building `W'` for SD 1.5's 98 convs moved 4.7 GB through memory every step and kept 2.4 GB
//! of `W'` alive for the backward, whose kernel gradient `dL/dW' = dy cols^T` was a second
//! gemm the size of the forward; here the transform costs `d / o` of the gemm (under 3% for
//! SD 1.5) and nothing the size of a weight is made. `T` may also be `[c, d, d]`, one per input
//! channel (atoms-rec).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{col2im_channel, im2col_row, output, Conv, Geo, KernelGrad};
use super::{channel_grads, packed};
use super::{ConvConfig, FilterTransform};
use crate::cpu::matmul::{dense, dense_serial, Data, Mat};
use crate::cpu::{float_op, slices, task_len, weights, Float, SendPtr};
use crate::weight_cache::{Kept, Use};
use crate::Result;

/// The fused op on contiguous inputs of one dtype (f32 or f64): `third` is `T` itself, or, with
/// `atoms = Some((D0, scale))`, the tuned `dD` from which `T = I + scale D0^T dD` is formed
/// inside the op (so an adapted conv adds no graph node of its own).
pub(super) fn conv2d_transformed(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (third, atoms): (&Tensor, Option<(Tensor, f64)>),
    cfg: ConvConfig,
    kept: Option<Kept>,
) -> Result<Tensor> {
    let atoms = match atoms {
        Some((d0, s)) => Some((d0.detach().to_dtype(x.dtype())?, s)),
        None => None,
    };
    let op = TransformedConv {
        cfg,
        atoms,
        bias: bias.map(Tensor::detach),
        kept,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &third.contiguous()?, op)
}

struct TransformedConv {
    cfg: ConvConfig,
    /// A frozen bias `[o]`, added in the kernel.
    bias: Option<Tensor>,
    /// When set, the third input is an atoms adapter's `dD [m, d]` and `T = I + scale D0^T dD`
    /// is formed here from these frozen atoms `D0 [m, d]`.
    atoms: Option<(Tensor, f64)>,
    /// The frozen weight's kept panels, for the forward on transformed columns and the column
    /// gradient.
    kept: Option<Kept>,
}

/// `T = I + scale D0^T dD` as numbers, `[d, d]`, from `D0` and `dD` (`[m, d]` each): the one
/// place the op forms `T`, forward and backward.
fn build_t<T: Float>(d0: &[T], dd: &[T], d: usize, scale: f64) -> Vec<T> {
    let m = d0.len() / d;
    let s = T::from(scale).unwrap_or(T::one());
    let mut t = vec![T::zero(); d * d];
    for j in 0..d {
        for k in 0..d {
            let mut acc = T::zero();
            for l in 0..m {
                acc = acc + d0[l * d + j] * dd[l * d + k];
            }
            let eye = if j == k { T::one() } else { T::zero() };
            t[j * d + k] = eye + if scale == 1.0 { acc } else { s * acc };
        }
    }
    t
}

/// `dst[j] = sum_k T(j, k) src[k]` for the `d` rows of `npix` numbers of one column block, with
/// `T(j, k) = t[j d + k]`, or `t[k d + j]` when `transposed`: one small gemm.
fn mix<T: Float>(t: &[T], src: &[T], dst: &mut [T], d: usize, transposed: bool) {
    let npix = src.len() / d;
    // SAFETY: t is [d, d], src and dst [d, npix].
    unsafe { dense_serial(dst, t, src, (d, npix, d), transposed, false, false) };
}

/// `W' = Wr T` (one `T`, or `T[c]` for the filters reading channel `c`), `[o, c d]`.
fn transform_weight<T: Float>(w: &[T], t: &[T], g: &Geo) -> Vec<T> {
    let d = g.kh * g.kw;
    let grouped = t.len() > d * d;
    let mut out = vec![T::zero(); w.len()];
    out.par_chunks_mut(g.c * d)
        .zip(w.par_chunks(g.c * d))
        .with_min_len(task_len(g.c * d * d))
        .for_each(|(dst, src)| {
            if grouped {
                for (c, (dr, sr)) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)).enumerate() {
                    // SAFETY: sr is [1, d], T[c] is [d, d], dr [1, d].
                    unsafe {
                        dense_serial(dr, sr, &t[c * d * d..], (1, d, d), false, false, false)
                    };
                }
            } else {
                // SAFETY: src is [c, d], t [d, d], dst [c, d].
                unsafe { dense_serial(dst, src, t, (g.c, d, d), false, false, false) };
            }
        });
    out
}

/// The `d` raw im2col rows of input channel `c` of one image, into `raw [d, npix]`.
fn channel_cols<T: Float>(x: &[T], g: &Geo, c: usize, raw: &mut [T]) {
    let (d, npix) = (g.kh * g.kw, g.npix());
    for (r, row) in raw.chunks_exact_mut(npix).enumerate() {
        im2col_row(x, g, c * d + r, row);
    }
}

impl TransformedConv {
    /// `T` from the op's third input: `T` itself, or `dD` for an atoms adapter.
    fn transform<T: Float + candle_core::WithDType>(
        &self,
        third: &[T],
        d: usize,
    ) -> candle_core::Result<Vec<T>> {
        Ok(match &self.atoms {
            Some((d0, s)) => build_t(&d0.flatten_all()?.to_vec1::<T>()?, third, d, *s),
            None => third.to_vec(),
        })
    }

    fn forward<T: Float>(
        (x, w, t): (&[T], Data<'_, T>, &[T]),
        bias: Option<&[T]>,
        b: usize,
        g: &Geo,
        kept: Option<&Kept>,
    ) -> Vec<T> {
        let (npix, k, d) = (g.npix(), g.k(), g.kh * g.kw);
        let grouped = t.len() > d * d;
        if g.o < npix {
            // Fewer numbers in the kernel than in the columns: transform the kernel (a
            // temporary, not kept for the backward) and run the plain conv.
            let w = transform_weight(&w.widened(), t, g);
            return Conv::forward(x, Data::Plain(&w), bias, b, g);
        }
        let mut y = output(bias, b, g.o, npix);
        let mut cols = vec![T::zero(); k * npix];
        for (bi, yb) in y.chunks_exact_mut(g.o * npix).enumerate() {
            let xb = &x[bi * g.c * g.h * g.w..(bi + 1) * g.c * g.h * g.w];
            cols.par_chunks_mut(d * npix)
                .with_min_len(task_len(d * d * npix))
                .enumerate()
                .for_each(|(c, dst)| {
                    let tc = if grouped {
                        &t[c * d * d..(c + 1) * d * d]
                    } else {
                        t
                    };
                    let mut raw = vec![T::zero(); d * npix];
                    channel_cols(xb, g, c, &mut raw);
                    mix(tc, &raw, dst, d, false);
                });
            let (wm, rows, add) = (Mat::new(w, g.o, k), b * npix, bias.is_some());
            if !Kept::product(kept, Use::ConvForward, (yb, &cols), wm, (rows, add)) {
                // SAFETY: yb is [o, npix], w is [o, k], cols [k, npix].
                unsafe { dense(yb, w, &cols, (g.o, npix, k), false, false, add) };
            }
        }
        y
    }

    /// `dL/dT` and, when `want_dx`, `dL/dx`, packed as `[dx (b c h w), dT]` in one buffer.
    fn backward<T: Float>(
        (x, w, t, dy): (&[T], Data<'_, T>, &[T], &[T]),
        b: usize,
        g: &Geo,
        want_dx: bool,
        kept: Option<&Kept>,
    ) -> Vec<T> {
        let (npix, k, d) = (g.npix(), g.k(), g.kh * g.kw);
        let (plane, dd) = (g.h * g.w, d * d);
        let grouped = t.len() > dd;
        let nx = if want_dx { b * g.c * plane } else { 0 };
        // W^T's kept panels serve products over at most MAX_ROWS pixels of the batch
        let kept = kept.filter(|k| k.serves(b * npix));
        let mut out = vec![T::zero(); nx + t.len()];
        let (dx, dt) = out.split_at_mut(nx);
        // dcols' = W^T dy whole, where the bf16 products do not take it a group of channels
        // at a time
        let mut dcp = Vec::new();
        for bi in 0..b {
            let xb = &x[bi * g.c * plane..(bi + 1) * g.c * plane];
            let dyb = &dy[bi * g.o * npix..(bi + 1) * g.o * npix];
            // this image's planes of dx (none without want_dx: dx is empty, never written)
            let dxb = SendPtr(dx[(bi * g.c * plane).min(nx)..].as_mut_ptr());
            // One input channel: its share of dT and, when wanted, its plane of dx.
            let channel = |c: usize, dc: &[T]| -> Vec<T> {
                let tc = if grouped { &t[c * dd..(c + 1) * dd] } else { t };
                // SAFETY: plane `c` of this image's dx, which only channel `c` writes.
                let mut dx_c = want_dx.then(|| unsafe {
                    std::slice::from_raw_parts_mut(dxb.get().add(c * plane), plane)
                });
                let x_c = &xb[c * plane..(c + 1) * plane];
                if let Some(part) = channel_grads::channel((x_c, dc, tc), g, dx_c.as_deref_mut()) {
                    return part;
                }
                let mut raw = vec![T::zero(); d * npix];
                channel_cols(xb, g, c, &mut raw);
                // dT_c = dcols'_c cols_c^T: [d, npix] x [npix, d].
                let mut part = vec![T::zero(); dd];
                // SAFETY: dc and raw are [d, npix], part [d, d].
                unsafe { dense_serial(&mut part, dc, &raw, (d, d, npix), false, true, false) };
                if let Some(p) = dx_c {
                    mix(tc, dc, &mut raw, d, true); // raw now holds dcols = T^T dcols'
                    col2im_channel(&raw, g, p);
                }
                part
            };
            let parts = match packed::column_grads((w, dyb), g, channel, kept) {
                Some(parts) => parts,
                None => {
                    dcp.resize(k * npix, T::zero());
                    // W is [o, k], read transposed.
                    // SAFETY: dcp is [k, npix], w [o, k], dyb [o, npix].
                    unsafe { dense(&mut dcp, w, dyb, (k, npix, g.o), true, false, false) };
                    (0..g.c)
                        .into_par_iter()
                        .with_min_len(task_len(d * d * npix))
                        .map(|c| channel(c, &dcp[c * d * npix..(c + 1) * d * npix]))
                        .collect()
                }
            };
            // Summed in channel order: the same bits on any number of threads.
            for (c, part) in parts.iter().enumerate() {
                let dst = if grouped {
                    &mut dt[c * dd..(c + 1) * dd]
                } else {
                    &mut dt[..]
                };
                dst.iter_mut().zip(part).for_each(|(a, &p)| *a = *a + p);
            }
        }
        out
    }
}

impl CustomOp3 for TransformedConv {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-transformed"
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
        let g = Geo::new(l1.dims(), l2.dims(), self.cfg)?;
        let _time = crate::op_times::start(|| format!("{} forward {}", self.name(), g.label()));
        let b = l1.dims()[0];
        let y = float_op!(s1.dtype(), "atomtune-conv2d-transformed", |F| {
            let t = self.transform(slices::<F>(s3, l3)?, g.kh * g.kw)?;
            let bias = self.bias.as_ref().map(|t| t.to_vec1::<F>()).transpose()?;
            let (x, w) = (slices::<F>(s1, l1)?, weights::<F>(s2, l2)?);
            Self::forward((x, w, &t), bias.as_deref(), b, &g, self.kept.as_ref())
        });
        Ok((y, Shape::from((b, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geo::new(x.dims(), w.dims(), self.cfg)?;
        let _time = crate::op_times::start(|| format!("{} backward {}", self.name(), g.label()));
        let dy = dy.detach().contiguous()?;
        let (want_dx, want_dt) = (x.track_op(), t.track_op());
        // The third input is T itself, or dD from which T is formed.
        let third = t;
        let t = &match &self.atoms {
            Some((d0, s)) => FilterTransform::Atoms {
                atoms: d0.clone(),
                delta: third.detach(),
                scale: *s,
            }
            .matrix()?,
            None => third.detach(),
        };
        let (mut dx, mut dt) = (None, None);
        if want_dx || want_dt {
            let op = TransformedConvGrad {
                geo: g,
                t: t.detach(),
                want_dx,
                kept: self.kept.clone(),
            };
            let packed = x.detach().apply_op3_no_bwd(&w.detach(), &dy, &op)?;
            let nx = if want_dx { x.elem_count() } else { 0 };
            if want_dx {
                dx = Some(packed.narrow(0, 0, nx)?.reshape(x.dims())?);
            }
            if want_dt {
                let d_t = packed.narrow(0, nx, t.elem_count())?.reshape(t.dims())?;
                dt = Some(match &self.atoms {
                    // T = I + s D0^T dD: dL/d(dD) = s D0 dL/dT.
                    Some((d0, s)) => (d0.matmul(&d_t)? * *s)?,
                    None => d_t,
                });
            }
        }
        // A tracked base kernel (not how adapters use this op, but correct): with W' = Wr T,
        // dL/dWr = dL/dW' T^T.
        let dw = if w.track_op() {
            let op = KernelGrad {
                geo: g,
                kernel: w.dims().to_vec(),
            };
            let dwp = x.detach().contiguous()?.apply_op2_no_bwd(&dy, &op)?;
            let (o, c, d) = (g.o, g.c, g.kh * g.kw);
            let tt = t.detach();
            let dw = if tt.rank() == 3 {
                dwp.reshape((o, c, d))?
                    .transpose(0, 1)?
                    .matmul(&tt.transpose(1, 2)?)?
                    .transpose(0, 1)?
            } else {
                dwp.reshape((o * c, d))?.matmul(&tt.t()?)?
            };
            Some(dw.reshape(w.dims())?)
        } else {
            None
        };
        Ok((dx, dw, dt))
    }
}

/// The backward of [`TransformedConv`] as an op on `(x, w, dy)` (it reads them in place); `T`
/// is small and copied out of its tensor.
struct TransformedConvGrad {
    geo: Geo,
    t: Tensor,
    want_dx: bool,
    kept: Option<Kept>,
}

impl CustomOp3 for TransformedConvGrad {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-transformed-grad"
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
        let _time =
            crate::op_times::start(|| format!("{} forward {}", self.name(), self.geo.label()));
        let b = l1.dims()[0];
        let t = self.t.flatten_all()?;
        let out = float_op!(s1.dtype(), "atomtune-conv2d-transformed backward", |F| {
            let (x, w) = (slices::<F>(s1, l1)?, weights::<F>(s2, l2)?);
            let (t, dy) = (&t.to_vec1::<F>()?, slices::<F>(s3, l3)?);
            TransformedConv::backward(
                (x, w, t, dy),
                b,
                &self.geo,
                self.want_dx,
                self.kept.as_ref(),
            )
        });
        let nx = if self.want_dx {
            l1.shape().elem_count()
        } else {
            0
        };
        let len = nx + t.elem_count();
        Ok((out, Shape::from(len)))
    }
}
