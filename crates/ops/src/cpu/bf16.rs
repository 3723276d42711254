//! Matrix products with bf16 operands and f32 accumulation on CPUs with AVX512-BF16 (Zen 4 and
//! later, Cooper Lake, Sapphire Rapids and later): `vdpbf16ps` multiplies pairs of bf16 numbers
//! and adds both products to an f32 lane, twice the f32 FMA's multiply-adds per instruction.
//!
//! The mixed-precision policy of PyTorch's CPU autocast, for matrix products only: operands are
//! rounded to bf16 (to nearest, ties to even) as they are packed, products are summed in f32,
//! and everything else (inputs, outputs, norms, softmax, the loss, parameters, gradients) stays
//! f32. Off by default; [`set_enabled`] (or `ATOMTUNE_CPU_BF16=1`) turns it on for the process,
//! and [`active`] says whether the products run here (on, and the CPU has the instructions).
//!
//! Layout: `b [k, n]` is packed in panels of [`NR`] columns, each `[k/2][NR][2]` (a pair of
//! consecutive `k` per column, as `vdpbf16ps` reads them); `a [m, k]` in panels of [`MR`] rows,
//! `[k/2][MR]` pairs. A micro-kernel keeps an `MR x NR` block of the result in 24 registers and
//! walks `k` two at a time; the result is written once per [`KC`] block of `k`.

use std::sync::atomic::{AtomicU8, Ordering};

use super::matmul::{Dst, Mat};

/// Rows of the micro-kernel's block.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's block (two vectors of 16 f32).
pub(crate) const NR: usize = 32;
/// `k` per block (even): a `KC x NR` panel of `b` is 16 KB of bf16, in L1.
pub(crate) const KC: usize = 256;
/// Rows of `a` per block (a multiple of `MR`): a `MC x KC` block is 96 KB of bf16, in L2.
pub(crate) const MC: usize = 192;

/// The environment variable that turns bf16 products on (`1`) for a process that does not
/// choose itself (benchmarks, tests); `atomtune --dtype bf16` turns them on with [`set_enabled`].
pub const VAR: &str = "ATOMTUNE_CPU_BF16";

/// 0: not decided yet (the environment decides), 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Turns bf16 products on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether bf16 products are turned on: by [`set_enabled`], else by `ATOMTUNE_CPU_BF16=1`.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = match std::env::var(VAR).as_deref() {
                Ok("1") => true,
                Ok("0") | Err(_) => false,
                Ok(other) => {
                    eprintln!(
                        "warning: {VAR}={other:?} is neither 1 nor 0; bf16 products stay off"
                    );
                    false
                }
            };
            // a racing set_enabled wins
            let _ = STATE.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            STATE.load(Ordering::Relaxed) == 2
        }
        s => s == 2,
    }
}

/// Whether the CPU has the instructions (AVX512-BF16 with AVX512F).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether f32 products run in bf16 now: turned on and supported.
pub fn active() -> bool {
    enabled() && supported()
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN), as its bits.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[cfg(test)]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A seen `rows x cols` matrix packed in panels of `w` rows: panel `p`, pair `q` of columns,
/// row `r` of the panel at `((p * cp + q) * w + r) * 2 + (column % 2)` (`cp`: column pairs,
/// rounded up), zero past the matrix. Panels are packed in parallel, each read in the order its
/// memory runs.
fn pack(m: &Mat<'_, f32>, w: usize) -> (Vec<u16>, usize) {
    use rayon::prelude::*;
    let (rows, cols) = m.shape();
    let (cs, rs) = m.strides();
    let cp = cols.div_ceil(2);
    let mut out = vec![0u16; rows.div_ceil(w) * cp * w * 2];
    let panel_len = cp * w * 2;
    let pack_panel = |(p, panel): (usize, &mut [u16])| {
        let r_end = (rows - p * w).min(w);
        if cs == 1 {
            for r in 0..r_end {
                let i = p * w + r;
                let row = &m.data[i * rs..i * rs + cols];
                let mut pairs = row.chunks_exact(2);
                for (q, pair) in pairs.by_ref().enumerate() {
                    let o = (q * w + r) * 2;
                    panel[o] = to_bf16(pair[0]);
                    panel[o + 1] = to_bf16(pair[1]);
                }
                if let [last] = pairs.remainder() {
                    panel[((cols / 2) * w + r) * 2] = to_bf16(*last);
                }
            }
        } else {
            for j in 0..cols {
                let base = ((j / 2) * w) * 2 + j % 2;
                for r in 0..r_end {
                    panel[base + r * 2] = to_bf16(m.data[(p * w + r) * rs + j * cs]);
                }
            }
        }
    };
    if rows * cols >= 1 << 16 {
        out.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(pack_panel);
    } else {
        out.chunks_mut(panel_len).enumerate().for_each(pack_panel);
    }
    (out, cp)
}

/// A raw pointer that may cross to the pool's threads: each task writes its own columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint parts of the destination (see `gemm`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst [m, n] (+)= scale a @ b` with bf16 operands and f32 sums, `threads` tasks over column
/// panels. Returns `false` (and does nothing) where the CPU lacks AVX512-BF16.
///
/// # Safety
/// As [`super::matmul::gemm`]: `dst` valid for `m` rows of `n` writes, `rs` apart (0: `n`).
pub(crate) unsafe fn gemm(
    threads: usize,
    dst: Dst<f32>,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    scale: f32,
    accumulate: bool,
) -> bool {
    if !supported() {
        return false;
    }
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    assert_eq!(k, k2);
    let rs = if dst.rs == 0 { n } else { dst.rs };
    if m == 0 || n == 0 {
        return true;
    }
    let (pa, kp) = pack(&a, MR);
    // `b` seen transposed: its columns are the rows of the panels
    let (pb, _) = pack(&b.t(), NR);
    let col_panels = n.div_ceil(NR);
    let out = SendPtr(dst.ptr);
    // GotoBLAS's order: a `KC`-deep block of `MC` rows of `a` (in L2) meets each `KC x NR`
    // panel of `b` (in L1) in turn.
    let row_panels = m.div_ceil(MR);
    let run = |p0: usize, p1: usize| {
        let mut q0 = 0;
        while q0 < kp {
            let q1 = (q0 + KC / 2).min(kp);
            let add = accumulate || q0 > 0;
            for i0 in (0..row_panels).step_by(MC / MR) {
                for p in p0..p1 {
                    let bpanel = &pb[(p * kp + q0) * NR * 2..(p * kp + q1) * NR * 2];
                    let (c0, cols) = (p * NR, NR.min(n - p * NR));
                    for i in i0..(i0 + MC / MR).min(row_panels) {
                        let apanel = &pa[(i * kp + q0) * MR * 2..(i * kp + q1) * MR * 2];
                        let (r0, rows) = (i * MR, MR.min(m - i * MR));
                        // SAFETY: `supported()` checked the instructions; the panels hold
                        // `q1 - q0` pairs; the block lies within `dst` (rows < m, columns < n).
                        unsafe {
                            kernel(
                                apanel,
                                bpanel,
                                q1 - q0,
                                out.get().add(r0 * rs + c0),
                                rs,
                                (rows, cols),
                                scale,
                                add,
                            )
                        }
                    }
                }
            }
            q0 = q1;
        }
    };
    let tasks = threads.clamp(1, col_panels);
    if tasks == 1 {
        run(0, col_panels);
    } else {
        let per = col_panels.div_ceil(tasks);
        rayon::scope(|s| {
            for t in 0..tasks {
                let (p0, p1) = (t * per, ((t + 1) * per).min(col_panels));
                if p0 < p1 {
                    s.spawn(move |_| run(p0, p1));
                }
            }
        });
    }
    true
}

/// One `MR x NR` block over `pairs` pairs of `k`: `c (+)= scale * sum a b` for the first
/// `rows x cols` of it (the packed panels are zero past the matrix).
///
/// # Safety
/// AVX512-BF16 and AVX512F must be present; `a` holds `pairs * MR * 2` numbers, `b`
/// `pairs * NR * 2`; `c` is valid for `rows` rows of `cols` writes, `rs` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    a: &[u16],
    b: &[u16],
    pairs: usize,
    c: *mut f32,
    rs: usize,
    (rows, cols): (usize, usize),
    scale: f32,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    for q in 0..pairs {
        // SAFETY: within the panels (the caller's promise); unaligned loads.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(q * NR * 2).cast()));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(pb.add(q * NR * 2 + 32).cast()));
            let arow = pa.add(q * MR * 2).cast::<i32>();
            for (r, acc) in acc.iter_mut().enumerate() {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(arow.add(r).read_unaligned()));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
            }
        }
    }
    let s = _mm512_set1_ps(scale);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (h, v) in acc.iter().enumerate() {
            let c0 = h * 16;
            if c0 >= cols {
                break;
            }
            let lanes = (cols - c0).min(16);
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            // SAFETY: the first `lanes` columns of row `r` lie within the block.
            unsafe {
                let p = c.add(r * rs + c0);
                let mut y = _mm512_mul_ps(*v, s);
                if accumulate {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p));
                }
                _mm512_mask_storeu_ps(p, mask, y);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _: &[u16],
    _: &[u16],
    _: usize,
    _: *mut f32,
    _: usize,
    _: (usize, usize),
    _: f32,
    _: bool,
) {
    unreachable!("supported() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1)
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even (1 + 2^-6)
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(
            from_bf16(to_bf16(-2.5e-3)),
            f32::from_bits((-2.5e-3f32).to_bits().wrapping_add(0x8000) & 0xffff_0000)
        );
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(
            from_bf16(to_bf16(f32::MAX)),
            f32::INFINITY,
            "rounds past the largest bf16"
        );
    }

    fn wave(n: usize, s: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * s).sin() * 3.0) + 0.25)
            .collect()
    }

    /// Against an f64 product of the same bf16-rounded operands: exact up to f32 sums, so
    /// within a few f32 roundings of `sum |a||b|` per element; shapes with edges in every
    /// dimension, transposed reads, strided rows, accumulation and scale, one and two tasks.
    #[test]
    fn bf16_products_equal_f64_of_the_rounded_operands() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 256),
            (25, 70, 601),
            (64, 96, 300),
            // large enough to pack in parallel, several row blocks and k blocks
            (400, 70, 601),
        ] {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = wave(m * k, 0.37);
                let bv = wave(k * n, 0.11);
                let a = if a_t {
                    Mat::new(&av, k, m).t()
                } else {
                    Mat::new(&av, m, k)
                };
                let b = if b_t {
                    Mat::new(&bv, n, k).t()
                } else {
                    Mat::new(&bv, k, n)
                };
                let rs = n + 3;
                let prior = wave(m * rs, 0.05);
                for (threads, accumulate, scale) in [(1, false, 1.0f32), (2, true, 0.5)] {
                    let mut c = prior.clone();
                    let dst = Dst {
                        ptr: c.as_mut_ptr(),
                        rs,
                    };
                    // SAFETY: `c` holds m rows of rs >= n.
                    assert!(unsafe { gemm(threads, dst, a, b, scale, accumulate) });
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut size) = (0f64, 0f64);
                            for l in 0..k {
                                let x = from_bf16(to_bf16(a.at(i, l))) as f64;
                                let y = from_bf16(to_bf16(b.at(l, j))) as f64;
                                want += x * y;
                                size += (x * y).abs();
                            }
                            want *= scale as f64;
                            if accumulate {
                                want += prior[i * rs + j] as f64;
                            }
                            let got = c[i * rs + j] as f64;
                            let tol = 4.0
                                * f32::EPSILON as f64
                                * (size * scale as f64 + want.abs() + 1e-30)
                                * (k as f64).log2().max(1.0);
                            assert!(
                                (got - want).abs() <= tol,
                                "{m}x{n}x{k} a_t {a_t} b_t {b_t}: [{i},{j}] {got} vs {want}"
                            );
                        }
                        for j in n..rs {
                            assert_eq!(c[i * rs + j], prior[i * rs + j], "wrote past the row");
                        }
                    }
                }
            }
        }
    }
}
