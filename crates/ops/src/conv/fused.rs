//! The fused CPU convolution: im2col and one gemm forward, and a backward that computes only the
//! gradients someone needs.
//!
//! - forward: `cols = im2col(x)` (`[c kh kw, ho wo]`, skipped for 1x1 stride-1 convs), then
//!   `y = W cols`;
//! - input gradient, when the input is tracked: `dx = col2im(W^T dy)`, one gemm that reads the
//!   kernel transposed in place (an earlier version convolved `dy` with a transposed, flipped
//!   copy of the kernel: two weight-sized copies per conv per step) and a scatter back onto
//!   the input planes, for any stride and padding;
//! - kernel gradient, when the kernel is tracked (adapted layers): `dW = dy cols^T`.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{packed, winograd, ConvConfig};
use crate::cpu::matmul::{dense, Data};
use crate::cpu::{as_f32, as_f32_mut, float_op, slices, task_len, weights, Float};
use crate::Result;

/// The fused op on contiguous inputs of one dtype (f32 or f64).
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: ConvConfig,
) -> Result<Tensor> {
    let op = Conv {
        cfg,
        bias: bias.map(Tensor::detach),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// `b` images of `o` channels of `npix` pixels, each channel starting at its frozen bias (or 0):
/// the output buffer the gemms then accumulate into.
pub(super) fn output<T: Float>(bias: Option<&[T]>, b: usize, o: usize, npix: usize) -> Vec<T> {
    let Some(bias) = bias else {
        return vec![T::zero(); b * o * npix];
    };
    assert_eq!(bias.len(), o, "a bias of one number a channel");
    // one filling pass, each row written once (zeroing the buffer first was a second pass)
    let mut y = Vec::with_capacity(b * o * npix);
    for &v in bias.iter().cycle().take(b * o) {
        y.resize(y.len() + npix, v);
    }
    y
}

pub(super) struct Conv {
    cfg: ConvConfig,
    /// A frozen bias `[o]`, added in the kernel (the output starts from it).
    bias: Option<Tensor>,
}

/// Geometry of one conv.
#[derive(Clone, Copy)]
pub(super) struct Geo {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) s: usize,
    pub(super) p: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geo {
    /// The geometry of `x` (`xs` = `[b, c, h, w]`) convolved with `w` (`ws` = `[o, c, kh, kw]`).
    pub(super) fn new(xs: &[usize], ws: &[usize], cfg: ConvConfig) -> candle_core::Result<Geo> {
        let (&[_, c, h, w], &[o, c2, kh, kw]) = (xs, ws) else {
            candle_core::bail!(
                "conv2d expects [b, c, h, w] and [o, c, kh, kw], got {xs:?} and {ws:?}"
            );
        };
        let (s, p) = (cfg.stride, cfg.padding);
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

    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    pub(super) fn npix(&self) -> usize {
        self.ho * self.wo
    }

    /// Output rows per band of the forward: all of them while the im2col matrix of
    /// `elem`-byte numbers fits `budget` bytes.
    fn band_rows(&self, elem: usize, budget: usize) -> usize {
        let row = self.k() * self.wo * elem;
        (budget / row.max(1)).clamp(1, self.ho.max(1))
    }

    /// A 1x1 stride-1 unpadded conv reads the input as its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }
}

/// The most bytes an im2col matrix of the forward takes: above it, the output is computed in
/// bands of rows (a VAE's full-resolution conv at 512x512, 256 channels, would take 2.4 GB at
/// once; at 1024x1024, 9.6 GB). The UNet's convs stay whole at SD 1.5's and SDXL's sizes (at
/// most 189 MB).
const COLS_BUDGET: usize = 256 << 20;

/// `cols [c kh kw, (oy1 - oy0) wo]` of output rows `oy0..oy1` of one image `x [c, h, w]`, rows
/// of `cols` in parallel.
fn im2col<T: Float>(x: &[T], g: &Geo, (oy0, oy1): (usize, usize), cols: &mut [T]) {
    let n = (oy1 - oy0) * g.wo;
    cols.par_chunks_mut(n)
        .with_min_len(task_len(n))
        .enumerate()
        .for_each(|(row, out)| im2col_band(x, g, row, (oy0, oy1), out));
}

/// Row `row` = `(c, i, j)` of the im2col matrix of one image `x [c, h, w]`: input channel `c`
/// read at kernel offset `(i, j)` for every output pixel, zero where that falls in the padding.
pub(super) fn im2col_row<T: Float>(x: &[T], g: &Geo, row: usize, out: &mut [T]) {
    im2col_band(x, g, row, (0, g.ho), out)
}

/// [`im2col_row`] for the output rows `oy0..oy1` only.
fn im2col_band<T: Float>(x: &[T], g: &Geo, row: usize, (oy0, oy1): (usize, usize), out: &mut [T]) {
    let tap = g.tap(row);
    for (oy, dst) in (oy0..oy1).zip(out.chunks_exact_mut(g.wo)) {
        im2col_run(x, g, &tap, (oy, 0), dst);
    }
}

/// What row `(c, i, j)` of the im2col matrix reads: input channel `c` at kernel offset `(i, j)`,
/// and the output columns whose input column `ox s + j - p` lies inside `[0, w)`.
pub(super) struct Tap {
    c: usize,
    i: usize,
    j: usize,
    inside: (usize, usize),
}

impl Geo {
    /// The conv's channels, kernel, stride and input size, for [`crate::op_times`]' labels:
    /// `320->640 3x3/1 at 64x64`.
    pub(super) fn label(&self) -> String {
        let Geo {
            c,
            o,
            kh,
            kw,
            s,
            h,
            w,
            ..
        } = self;
        format!("{c}->{o} {kh}x{kw}/{s} at {h}x{w}")
    }

    /// Row `row` of the im2col matrix.
    pub(super) fn tap(&self, row: usize) -> Tap {
        let kk = self.kh * self.kw;
        let j = row % self.kw;
        let ox0 = self.p.saturating_sub(j).div_ceil(self.s).min(self.wo);
        let ox1 = (self.w + self.p).saturating_sub(j).div_ceil(self.s);
        Tap {
            c: row / kk,
            i: (row % kk) / self.kw,
            j,
            inside: (ox0, ox1.clamp(ox0, self.wo)),
        }
    }
}

/// Row `tap` of the im2col matrix of one image `x [c, h, w]` at output row `oy`, output columns
/// `ox..ox + len`, as the slice of `x` it is: where the conv has stride 1 and every one of those
/// columns reads inside the image (`None` elsewhere).
pub(super) fn im2col_slice<'a, T: Float>(
    x: &'a [T],
    g: &Geo,
    tap: &Tap,
    (oy, ox): (usize, usize),
    len: usize,
) -> Option<&'a [T]> {
    let iy = (oy + tap.i).checked_sub(g.p).filter(|&iy| iy < g.h)?;
    let inside = g.s == 1 && tap.inside.0 <= ox && ox + len <= tap.inside.1;
    // inside: ox + j - p >= 0
    let start = || (tap.c * g.h + iy) * g.w + ox + tap.j - g.p;
    inside.then(|| &x[start()..start() + len])
}

/// Row `tap` of the im2col matrix of one image `x [c, h, w]` at output row `oy`, output columns
/// `ox..ox + out.len()` (within the row): zero where the tap falls in the padding.
pub(super) fn im2col_run<T: Float>(
    x: &[T],
    g: &Geo,
    tap: &Tap,
    (oy, ox): (usize, usize),
    out: &mut [T],
) {
    let iy = (oy * g.s + tap.i) as isize - g.p as isize;
    if iy < 0 || iy >= g.h as isize {
        out.fill(T::zero());
        return;
    }
    let end = ox + out.len();
    let (vx0, vx1) = (tap.inside.0.clamp(ox, end), tap.inside.1.clamp(ox, end));
    out[..vx0 - ox].fill(T::zero());
    out[vx1 - ox..].fill(T::zero());
    if vx0 == vx1 {
        return;
    }
    let start = (tap.c * g.h + iy as usize) * g.w + vx0 * g.s + tap.j - g.p;
    let dst = &mut out[vx0 - ox..vx1 - ox];
    if g.s == 1 {
        dst.copy_from_slice(&x[start..start + dst.len()]);
    } else {
        for (n, v) in dst.iter_mut().enumerate() {
            *v = x[start + n * g.s];
        }
    }
}

/// Adds the column block `dcols [d, npix]` of one input channel back onto its `plane [h, w]`
/// (the adjoint of im2col for that channel).
pub(super) fn col2im_channel<T: Float>(dcols: &[T], g: &Geo, plane: &mut [T]) {
    let npix = g.npix();
    for (r, row) in dcols.chunks_exact(npix).enumerate() {
        // the channel's own rows: taps (i, j) of channel 0's geometry
        let Tap {
            i,
            j,
            inside: (ox0, ox1),
            ..
        } = g.tap(r);
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

impl Conv {
    fn geo(&self, xs: &[usize], ws: &[usize]) -> candle_core::Result<Geo> {
        Geo::new(xs, ws, self.cfg)
    }

    pub(super) fn forward<T: Float>(
        x: &[T],
        w: Data<'_, T>,
        bias: Option<&[T]>,
        b: usize,
        g: &Geo,
    ) -> Vec<T> {
        Self::forward_in_bands(x, w, bias, b, g, COLS_BUDGET)
    }

    /// [`Conv::forward`] with im2col matrices of at most `budget` bytes (but one output row).
    fn forward_in_bands<T: Float>(
        x: &[T],
        w: Data<'_, T>,
        bias: Option<&[T]>,
        b: usize,
        g: &Geo,
        budget: usize,
    ) -> Vec<T> {
        let (npix, k) = (g.npix(), g.k());
        let mut y = output(bias, b, g.o, npix);
        if let (Some(x), Some(w)) = (as_f32(x), w.as_f32()) {
            let y32 = as_f32_mut(&mut y).expect("T is f32, as x is");
            if winograd::applies(g, b) {
                winograd::forward((x, w), y32, b, g);
                return y;
            }
            if packed::applies(g) {
                packed::forward((x, w), y32, b, g, bias.is_some());
                return y;
            }
        }
        let band = g.band_rows(std::mem::size_of::<T>(), budget);
        if g.is_pointwise() || band == g.ho {
            each_image_cols(x, b, g, |bi, cols| {
                // SAFETY: y_b is [o, npix], w is [o, k], cols [k, npix].
                unsafe {
                    dense(
                        &mut y[bi * g.o * npix..(bi + 1) * g.o * npix],
                        w,
                        cols,
                        (g.o, npix, k),
                        false,
                        false,
                        bias.is_some(),
                    )
                };
            });
            return y;
        }
        // in bands of output rows: each band's im2col, its product into a band of y (gathered
        // into a buffer and back, as y's band is strided)
        let mut cols = vec![T::zero(); k * band * g.wo];
        let mut yband = vec![T::zero(); g.o * band * g.wo];
        for (xb, yb) in x
            .chunks_exact(g.c * g.h * g.w)
            .zip(y.chunks_exact_mut(g.o * npix))
            .take(b)
        {
            for oy0 in (0..g.ho).step_by(band) {
                let oy1 = (oy0 + band).min(g.ho);
                let (n, at) = ((oy1 - oy0) * g.wo, oy0 * g.wo);
                im2col(xb, g, (oy0, oy1), &mut cols[..k * n]);
                for (dst, src) in yband.chunks_exact_mut(n).zip(yb.chunks_exact(npix)) {
                    dst.copy_from_slice(&src[at..at + n]);
                }
                // SAFETY: yband is [o, n], w is [o, k], cols [k, n].
                unsafe {
                    dense(
                        &mut yband[..g.o * n],
                        w,
                        &cols[..k * n],
                        (g.o, n, k),
                        false,
                        false,
                        bias.is_some(),
                    )
                };
                for (src, dst) in yband.chunks_exact(n).zip(yb.chunks_exact_mut(npix)) {
                    dst[at..at + n].copy_from_slice(src);
                }
            }
        }
        y
    }

    /// `dW [o, k] = sum_b dy_b [o, npix] @ cols_b^T`.
    fn kernel_grad<T: Float>(x: &[T], dy: &[T], b: usize, g: &Geo) -> Vec<T> {
        let (npix, k) = (g.npix(), g.k());
        let mut dw = vec![T::zero(); g.o * k];
        each_image_cols(x, b, g, |bi, cols| {
            // SAFETY: dy_b is [o, npix]; cols [k, npix] read transposed as [npix, k].
            unsafe {
                dense(
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
            im2col(xb, g, (0, g.ho), &mut cols);
            f(bi, &cols);
        }
    }
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
        let _time = crate::op_times::start(|| format!("{} forward {}", self.name(), g.label()));
        let b = l1.dims()[0];
        let y = float_op!(s1.dtype(), "atomtune-conv2d", |F| {
            let bias = self.bias.as_ref().map(|t| t.to_vec1::<F>()).transpose()?;
            Self::forward(
                slices::<F>(s1, l1)?,
                weights::<F>(s2, l2)?,
                bias.as_deref(),
                b,
                &g,
            )
        });
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
        let _time = crate::op_times::start(|| format!("{} backward {}", self.name(), g.label()));
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
pub(super) struct InputGrad {
    geo: Geo,
}

impl Conv {
    fn input_grad<T: Float>(w: Data<'_, T>, dy: &[T], b: usize, g: &Geo) -> Vec<T> {
        let (npix, k, plane) = (g.npix(), g.k(), g.h * g.w);
        let mut dx = vec![T::zero(); b * g.c * plane];
        if let (Some(w32), Some(dy32)) = (w.as_f32(), as_f32(dy)) {
            let dx32 = as_f32_mut(&mut dx).expect("T is f32, as dy is");
            if winograd::input_grad((w32, dy32), dx32, b, g) {
                return dx;
            }
        }
        let mut dcols = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); k * npix]
        };
        for (bi, dxb) in dx.chunks_exact_mut(g.c * plane).enumerate() {
            let dyb = &dy[bi * g.o * npix..(bi + 1) * g.o * npix];
            if g.is_pointwise() {
                // SAFETY: dxb is [c, npix], w [o, c] read transposed, dyb [o, npix].
                unsafe { dense(dxb, w, dyb, (k, npix, g.o), true, false, false) };
                continue;
            }
            // SAFETY: dcols is [k, npix], w [o, k] read transposed, dyb [o, npix].
            unsafe { dense(&mut dcols, w, dyb, (k, npix, g.o), true, false, false) };
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
        let _time =
            crate::op_times::start(|| format!("{} forward {}", self.name(), self.geo.label()));
        let b = l2.dims()[0];
        // the gradient's dtype: the kernel may be a bf16 weight beside f32 activations
        let dx = float_op!(s2.dtype(), "atomtune-conv2d backward", |F| {
            Conv::input_grad(weights::<F>(s1, l1)?, slices::<F>(s2, l2)?, b, &self.geo)
        });
        let g = &self.geo;
        Ok((dx, Shape::from((b, g.c, g.h, g.w))))
    }
}

/// The kernel gradient `dW = sum_b dy_b cols_b^T` as an op on `(x, dy)`, so it reads both in
/// place.
pub(super) struct KernelGrad {
    pub(super) geo: Geo,
    pub(super) kernel: Vec<usize>,
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
        let _time = crate::op_times::start(|| format!("{} forward", self.name()));
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

    /// Seeded values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5);
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The forward in bands of output rows (one row, three rows, a band as large as the
    /// budget allows) equals the forward in one piece, with and without bias, strides 1 and 2.
    #[test]
    fn a_forward_in_bands_equals_the_whole() {
        let (b, c, h, w, o) = (2, 3, 11, 7, 5);
        let x = values(b * c * h * w, 1);
        let wt = values(o * c * 9, 2);
        let bias = values(o, 3);
        for stride in [1, 2] {
            let cfg = ConvConfig { stride, padding: 1 };
            let g = Geo::new(&[b, c, h, w], &[o, c, 3, 3], cfg).unwrap();
            for bias in [None, Some(bias.as_slice())] {
                let whole = Conv::forward_in_bands(&x, (&wt).into(), bias, b, &g, usize::MAX);
                let row = g.k() * g.wo * 4;
                for budget in [1, 3 * row, (g.ho - 1) * row] {
                    assert!(g.band_rows(4, budget) < g.ho);
                    let banded = Conv::forward_in_bands(&x, (&wt).into(), bias, b, &g, budget);
                    let diff = whole
                        .iter()
                        .zip(&banded)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(diff < 1e-5, "stride {stride} budget {budget}: {diff}");
                }
            }
        }
    }
}
