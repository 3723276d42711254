//! 2-d convolution as one op: im2col and one gemm forward, and a backward that computes only the
//! gradients someone needs.
//!
//! candle's own conv2d backward computes the kernel gradient of every conv, frozen or not, and
//! the input gradient with a direct `conv_transpose2d` loop several times slower than a conv
//! (PERF-NOTES: 434 ms against PyTorch's 56 ms for a 320-channel 3x3 conv at 64x64). Here:
//!
//! - forward: `cols = im2col(x)` (`[c kh kw, ho wo]`, skipped for 1x1 stride-1 convs), then
//!   `y = W cols`;
//! - input gradient, when the input is tracked: `dx = col2im(W^T dy)`, one gemm that reads the
//!   kernel transposed in place (an earlier version convolved `dy` with a transposed, flipped
//!   copy of the kernel: two weight-sized copies per conv per step) and a scatter back onto
//!   the input planes, for any stride and padding;
//! - kernel gradient, when the kernel is tracked (adapted layers): `dW = dy cols^T`.
//!
//! The CPU runs f32 and f64 this way; other devices and dtypes use candle's conv2d, which is
//! also the reference the tests hold this op to.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::matmul::{self, Dst, Mat};
use crate::Result;

/// `CpuStorage::F32(body)` or `CpuStorage::F64(body)` by `dtype`, with `$t` naming the element
/// type inside `body`; any other dtype is an error naming the op.
macro_rules! float_op {
    ($dtype:expr, $name:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            DType::F64 => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $name),
        }
    };
}
pub(crate) use float_op;

mod transformed;
pub use transformed::{conv2d_atoms, conv2d_transformed};

/// `x [b, c, h, w]` convolved with `w [o, c, kh, kw]` at `stride` and `padding` (dilation 1,
/// one group).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype();
    if !fast {
        return Ok(x.conv2d(w, padding, stride, 1, 1)?);
    }
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv { stride, padding })?)
}

struct Conv {
    stride: usize,
    padding: usize,
}

/// The element types the CPU kernels run in (f32, f64).
pub(crate) trait Float: num_traits::Float + Send + Sync + 'static {
    /// `x` in this type (rounded for f32).
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        <Self as num_traits::NumCast>::from(x).unwrap_or_else(Self::nan)
    }

    /// `1 / (1 + e^-x)`.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).exp())
    }
}
impl Float for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        crate::fastmath::sigmoid(self)
    }
}
impl Float for f64 {}

/// Geometry of one conv.
#[derive(Clone, Copy)]
struct Geo {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geo {
    /// The geometry of `x` (`xs` = `[b, c, h, w]`) convolved with `w` (`ws` = `[o, c, kh, kw]`).
    fn new(xs: &[usize], ws: &[usize], stride: usize, padding: usize) -> candle_core::Result<Geo> {
        let (&[_, c, h, w], &[o, c2, kh, kw]) = (xs, ws) else {
            candle_core::bail!(
                "conv2d expects [b, c, h, w] and [o, c, kh, kw], got {xs:?} and {ws:?}"
            );
        };
        let (s, p) = (stride, padding);
        if c != c2 || h + 2 * p < kh || w + 2 * p < kw || s == 0 {
            candle_core::bail!(
                "conv2d: input {xs:?} does not fit kernel {ws:?} at stride {s} padding {p}"
            );
        }
        Ok(Geo {
            c,
            h,
            w,
            o,
            kh,
            kw,
            s,
            p,
            ho: (h + 2 * p - kh) / s + 1,
            wo: (w + 2 * p - kw) / s + 1,
        })
    }

    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn npix(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1 stride-1 unpadded conv reads the input as its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }
}

/// `cols [c kh kw, ho wo]` of one image `x [c, h, w]`, rows in parallel.
fn im2col<T: Float>(x: &[T], g: &Geo, cols: &mut [T]) {
    cols.par_chunks_mut(g.npix())
        .with_min_len(task_len(g.npix()))
        .enumerate()
        .for_each(|(row, out)| im2col_row(x, g, row, out));
}

/// Row `row` = `(c, i, j)` of the im2col matrix of one image `x [c, h, w]`: input channel `c`
/// read at kernel offset `(i, j)` for every output pixel, zero where that falls in the padding.
fn im2col_row<T: Float>(x: &[T], g: &Geo, row: usize, out: &mut [T]) {
    let kk = g.kh * g.kw;
    let (c, i, j) = (row / kk, (row % kk) / g.kw, row % g.kw);
    let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
    // Output columns whose input column ox s + j - p lies inside [0, w).
    let ox0 = g.p.saturating_sub(j).div_ceil(g.s).min(g.wo);
    let ox1 = (g.w + g.p).saturating_sub(j).div_ceil(g.s).clamp(ox0, g.wo);
    for oy in 0..g.ho {
        let dst = &mut out[oy * g.wo..(oy + 1) * g.wo];
        let iy = (oy * g.s + i) as isize - g.p as isize;
        if iy < 0 || iy >= g.h as isize || ox0 == ox1 {
            dst.fill(T::zero());
            continue;
        }
        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        dst[..ox0].fill(T::zero());
        dst[ox1..].fill(T::zero());
        let ix0 = ox0 * g.s + j - g.p;
        if g.s == 1 {
            dst[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
        } else {
            for (n, v) in dst[ox0..ox1].iter_mut().enumerate() {
                *v = src[ix0 + n * g.s];
            }
        }
    }
}

/// Adds the column block `dcols [d, npix]` of one input channel back onto its `plane [h, w]`
/// (the adjoint of im2col for that channel).
fn col2im_channel<T: Float>(dcols: &[T], g: &Geo, plane: &mut [T]) {
    let npix = g.npix();
    for (r, row) in dcols.chunks_exact(npix).enumerate() {
        let (i, j) = (r / g.kw, r % g.kw);
        // Output columns whose input column ox s + j - p lies inside [0, w).
        let ox0 = g.p.saturating_sub(j).div_ceil(g.s);
        let ox1 = ((g.w + g.p).saturating_sub(j)).div_ceil(g.s).min(g.wo);
        if ox0 >= ox1 {
            continue;
        }
        for oy in 0..g.ho {
            let iy = (oy * g.s + i) as isize - g.p as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let src = &row[oy * g.wo..(oy + 1) * g.wo];
            let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
            let ix0 = ox0 * g.s + j - g.p;
            if g.s == 1 {
                let n = ox1 - ox0;
                dst[ix0..ix0 + n]
                    .iter_mut()
                    .zip(&src[ox0..ox1])
                    .for_each(|(d, &s)| *d = *d + s);
            } else {
                for (n, &s) in src[ox0..ox1].iter().enumerate() {
                    let v = &mut dst[ix0 + n * g.s];
                    *v = *v + s;
                }
            }
        }
    }
}

/// How many items of `item` numbers each a parallel task takes, so that a task holds at least
/// 16K numbers: below that, waking threads costs more than the work (the tiny models' steps
/// spent a third of their time in thread hand-offs).
pub(crate) fn task_len(item: usize) -> usize {
    ((1 << 14) / item.max(1)).max(1)
}

/// Threads for a gemm of `m x n x k` multiply-adds: one below 256K of them.
fn parallelism((m, n, k): (usize, usize, usize)) -> gemm::Parallelism {
    let n_threads = rayon::current_num_threads();
    if n_threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(n_threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst [m, n] (+)= a @ b`, with `a` `[m, k]` or, when `a_t`, `[k, m]` read transposed, and `b`
/// `[k, n]` or, when `b_t`, `[n, k]` read transposed.
///
/// # Safety
/// The slices must hold the matrices.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Float>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    mnk: (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    gemm_on(parallelism(mnk), dst, a, b, mnk, a_t, b_t, accumulate)
}

/// [`gemm`] on one thread: for small products inside tasks that already run in parallel.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial<T: Float>(
    dst: &mut [T],
    a: &[T],
    b: &[T],
    mnk: (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    gemm_on(
        gemm::Parallelism::None,
        dst,
        a,
        b,
        mnk,
        a_t,
        b_t,
        accumulate,
    )
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on<T: Float>(
    par: gemm::Parallelism,
    dst: &mut [T],
    a: &[T],
    b: &[T],
    (m, n, k): (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    accumulate: bool,
) {
    debug_assert!(dst.len() >= m * n);
    let a = if a_t {
        Mat::new(a, k, m).t()
    } else {
        Mat::new(a, m, k)
    };
    let b = if b_t {
        Mat::new(b, n, k).t()
    } else {
        Mat::new(b, k, n)
    };
    // SAFETY: `dst` holds the `m x n` product (the caller's promise).
    unsafe { matmul::gemm(par, Dst::dense(dst), a, b, T::one(), accumulate) }
}

impl Conv {
    fn geo(&self, xs: &[usize], ws: &[usize]) -> candle_core::Result<Geo> {
        Geo::new(xs, ws, self.stride, self.padding)
    }

    fn forward<T: Float>(x: &[T], w: &[T], b: usize, g: &Geo) -> Vec<T> {
        let (npix, k) = (g.npix(), g.k());
        let mut y = vec![T::zero(); b * g.o * npix];
        each_image_cols(x, b, g, |bi, cols| {
            // SAFETY: y_b is [o, npix], w is [o, k], cols [k, npix].
            unsafe {
                gemm(
                    &mut y[bi * g.o * npix..(bi + 1) * g.o * npix],
                    w,
                    cols,
                    (g.o, npix, k),
                    false,
                    false,
                    false,
                )
            };
        });
        y
    }

    /// `dW [o, k] = sum_b dy_b [o, npix] @ cols_b^T`.
    fn kernel_grad<T: Float>(x: &[T], dy: &[T], b: usize, g: &Geo) -> Vec<T> {
        let (npix, k) = (g.npix(), g.k());
        let mut dw = vec![T::zero(); g.o * k];
        each_image_cols(x, b, g, |bi, cols| {
            // SAFETY: dy_b is [o, npix]; cols [k, npix] read transposed as [npix, k].
            unsafe {
                gemm(
                    &mut dw,
                    &dy[bi * g.o * npix..(bi + 1) * g.o * npix],
                    cols,
                    (g.o, k, npix),
                    false,
                    true,
                    bi > 0,
                )
            };
        });
        dw
    }
}

/// Calls `f(b, cols_b)` for each of the `b` images of `x`, with `cols_b [c kh kw, ho wo]` its
/// im2col matrix (the image itself for a pointwise conv), built in one reused buffer.
fn each_image_cols<T: Float>(x: &[T], b: usize, g: &Geo, mut f: impl FnMut(usize, &[T])) {
    let mut cols = if g.is_pointwise() {
        Vec::new()
    } else {
        vec![T::zero(); g.k() * g.npix()]
    };
    for (bi, xb) in x.chunks_exact(g.c * g.h * g.w).take(b).enumerate() {
        if g.is_pointwise() {
            f(bi, xb);
        } else {
            im2col(xb, g, &mut cols);
            f(bi, &cols);
        }
    }
}

pub(crate) fn slices<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("atomtune-conv2d needs contiguous inputs");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..z])
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "atomtune-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geo(l1.dims(), l2.dims())?;
        let b = l1.dims()[0];
        let y = float_op!(s1.dtype(), "atomtune-conv2d", |F| Self::forward(
            slices::<F>(s1, l1)?,
            slices::<F>(s2, l2)?,
            b,
            &g,
        ));
        Ok((y, Shape::from((b, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geo(x.dims(), w.dims())?;
        let dy = dy.detach().contiguous()?;
        let dx = if x.track_op() {
            let op = InputGrad { geo: g };
            Some(w.detach().apply_op2_no_bwd(&dy, &op)?.reshape(x.dims())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let op = KernelGrad {
                geo: g,
                kernel: w.dims().to_vec(),
            };
            Some(x.detach().contiguous()?.apply_op2_no_bwd(&dy, &op)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The input gradient `dx = col2im(W^T dy)` as an op on `(w, dy)`, so it reads both in place:
/// one gemm with the kernel read transposed (no flipped copy of the weight) and a scatter of the
/// column gradient back onto the input planes, for any stride and padding.
struct InputGrad {
    geo: Geo,
}

impl Conv {
    fn input_grad<T: Float>(w: &[T], dy: &[T], b: usize, g: &Geo) -> Vec<T> {
        let (npix, k, plane) = (g.npix(), g.k(), g.h * g.w);
        let mut dx = vec![T::zero(); b * g.c * plane];
        let mut dcols = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); k * npix]
        };
        for (bi, dxb) in dx.chunks_exact_mut(g.c * plane).enumerate() {
            let dyb = &dy[bi * g.o * npix..(bi + 1) * g.o * npix];
            if g.is_pointwise() {
                // SAFETY: dxb is [c, npix], w [o, c] read transposed, dyb [o, npix].
                unsafe { gemm(dxb, w, dyb, (k, npix, g.o), true, false, false) };
                continue;
            }
            // SAFETY: dcols is [k, npix], w [o, k] read transposed, dyb [o, npix].
            unsafe { gemm(&mut dcols, w, dyb, (k, npix, g.o), true, false, false) };
            let dk = g.kh * g.kw * npix;
            dxb.par_chunks_mut(plane)
                .zip(dcols.par_chunks(dk))
                .with_min_len(task_len(dk))
                .for_each(|(p, dc)| col2im_channel(dc, g, p));
        }
        dx
    }
}

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = l2.dims()[0];
        let dx = float_op!(
            s1.dtype(),
            "atomtune-conv2d backward",
            |F| Conv::input_grad(slices::<F>(s1, l1)?, slices::<F>(s2, l2)?, b, &self.geo,)
        );
        let g = &self.geo;
        Ok((dx, Shape::from((b, g.c, g.h, g.w))))
    }
}

/// The kernel gradient `dW = sum_b dy_b cols_b^T` as an op on `(x, dy)`, so it reads both in
/// place.
struct KernelGrad {
    geo: Geo,
    kernel: Vec<usize>,
}

impl candle_core::CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "atomtune-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = l1.dims()[0];
        let dw = float_op!(s1.dtype(), "atomtune-conv2d backward", |F| {
            Conv::kernel_grad(slices::<F>(s1, l1)?, slices::<F>(s2, l2)?, b, &self.geo)
        });
        Ok((dw, Shape::from(self.kernel.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_rel as rel, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn the_op_equals_candles_conv_forward_and_backward() {
        // (b, c, h, w, o, k, stride, padding)
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 4, 8, 8, 3, 1, 1, 0),
            (2, 3, 9, 9, 4, 3, 2, 1),
            (1, 2, 8, 8, 2, 3, 2, 1),
            (1, 3, 6, 6, 2, 3, 1, 0),
            (1, 2, 5, 5, 2, 3, 2, 0),
        ];
        for (b, c, h, w, o, k, s, p) in cases {
            for dtype in [DType::F32, DType::F64] {
                let r = |shape: &[usize]| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, kern) = (r(&[b, c, h, w]), r(&[o, c, k, k]));
                let fast = conv2d(&x, &kern, s, p).unwrap();
                let slow = x.conv2d(&kern, p, s, 1, 1).unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert_eq!(fast.dims(), slow.dims());
                assert!(
                    rel(&fast, &slow) < tol,
                    "{:?} forward {}",
                    (b, c, h, w, o, k, s, p),
                    rel(&fast, &slow)
                );
                let (gf, gs) = weighted_grads(&fast, &slow);
                for (name, v) in [("x", &x), ("w", &kern)] {
                    let e = rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                    assert!(e < tol * 10.0, "{:?} d{name} {e}", (b, c, h, w, o, k, s, p));
                }
            }
        }
    }

    /// Strided convs of inputs whose sides need different output paddings (candle's own conv
    /// backward cannot take them): the reference is the conv of the input padded with a zero
    /// column, whose output is the same, cropped back.
    #[test]
    fn strided_convs_of_uneven_inputs_have_the_right_input_gradient() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 8, 7), &Device::Cpu).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &Device::Cpu).unwrap();
        let y = conv2d(&x, &w, 2, 1).unwrap();
        let m = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu).unwrap();
        let dx = (y * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .clone();
        let xp = Var::from_tensor(&x.as_tensor().pad_with_zeros(3, 0, 1).unwrap()).unwrap();
        let yp = xp.conv2d(&w, 1, 2, 1, 1).unwrap();
        let dxp = (yp * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&xp)
            .unwrap()
            .clone();
        assert!(rel(&dx, &dxp.narrow(3, 0, 7).unwrap()) < 1e-5);
    }

    #[test]
    fn frozen_kernels_and_inputs_get_no_gradient_work() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &Device::Cpu).unwrap())
            .unwrap();
        let frozen = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &Device::Cpu).unwrap();
        let y = conv2d(&x, &frozen, 1, 1).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&frozen).is_none());
    }
}
