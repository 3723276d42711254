//! The per-channel work of the adapted conv's backward (`fused_transformed.rs`) for a 3x3 conv
//! of stride 1 padded by 1 (every 3x3 conv of SD's UNets but the downsamplers'), in AVX-512.
//! Given channel `c`'s rows of the column gradient `dcols'_c = (W^T dy)_c` (`[9, npix]`, from
//! the products):
//!
//! - its share of the transform's gradient, `dT_c = dcols'_c cols_c^T` (`9 x 9`), with the
//!   columns `cols_c` read straight from the image as shifted vectors of a row: no im2col rows
//!   are written;
//! - its plane of the input gradient, `dx_c = col2im(T^T dcols'_c)`: `T^T dcols'_c` once into a
//!   buffer the thread reuses, then each vector of the plane gathered from its 9 taps in one
//!   pass (col2im added 9 shifted rows into the plane in 9 passes).
//!
//! The general path formed the im2col rows, ran two small gemms (`9 x 9` by the pixels) through
//! the gemm crate, which packs both operands for each, and added the taps row by row.

use std::cell::Cell;

use super::fused::Geo;
use crate::cpu::{as_f32, as_f32_mut, Float};

/// Taps of a 3x3 filter.
const D: usize = 9;

thread_local! {
    /// `T^T dcols'_c` of the channel in hand, reused by the next channel on this thread.
    static MIXED: Cell<Vec<f32>> = Cell::default();
}

/// Channel `c`'s `dT_c` (`9 x 9`, row `j` for tap `j` of `dcols'`) and, when `dx` is given,
/// its plane of the input gradient written into `dx` (`[h, w]`, overwritten), from the
/// channel's plane `x` (`[h, w]`), its column-gradient rows `dc` (`[9, h w]`) and its transform
/// `t` (`T(j, k) = t[9 j + k]`). `None`, with nothing done, where this path does not apply: not
/// f32, not a 3x3 conv of stride 1 padded by 1, or no AVX512F.
pub(super) fn channel<T: Float>(
    (x, dc, t): (&[T], &[T], &[T]),
    g: &Geo,
    dx: Option<&mut [T]>,
) -> Option<Vec<T>> {
    let shape = (g.kh, g.kw, g.s, g.p, g.ho, g.wo) == (3, 3, 1, 1, g.h, g.w);
    if !shape || !avx512() {
        return None;
    }
    let (x, dc, t) = (as_f32(x)?, as_f32(dc)?, as_f32(t)?);
    let (h, w) = (g.h, g.w);
    let npix = h * w;
    assert!(x.len() >= npix && dc.len() >= D * npix && t.len() >= D * D);
    // SAFETY (both): AVX512F checked above; the sizes asserted above and below.
    let dt = unsafe { transform_grad(x, dc, (h, w)) };
    if let Some(dx) = dx {
        let dx = as_f32_mut(dx)?;
        assert!(dx.len() >= npix);
        let mut mixed = MIXED.take();
        mixed.resize(D * npix, 0.0);
        // SAFETY: as above; `mixed` holds `9 h w` numbers.
        unsafe { input_grad(dc, t, (h, w), &mut mixed, dx) };
        MIXED.set(mixed);
    }
    Some(dt.iter().map(|&v| T::from(v).expect("f32 is T")).collect())
}

/// Whether the CPU has AVX512F.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The lanes of a vector of pixels `x0..x0 + 16` of a row of `w` (`valid`: those below `w`)
/// whose neighbour `delta` (-1, 0 or 1) to the side lies in the row too.
fn shifted(valid: u16, x0: usize, delta: isize, w: usize) -> u16 {
    match delta {
        -1 if x0 == 0 => valid & !1,
        1 => valid & crate::cpu::bf16::first_lanes(w - x0 - 1),
        _ => valid,
    }
}

/// `dT[j][k] = sum_p dc[j][p] cols[k][p]`, `cols[k]` the image shifted by tap `k = 3 a + b`
/// (`x[oy + a - 1][ox + b - 1]`, zero past the edges): three taps `j` at a time, whose 27 sums
/// stay in registers, 16 pixels of a row at a time.
///
/// # Safety
/// AVX512F must be present; `x` holds `h w` numbers, `dc` `9 h w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_grad(x: &[f32], dc: &[f32], (h, w): (usize, usize)) -> [f32; D * D] {
    use std::arch::x86_64::*;
    let npix = h * w;
    let mut out = [0f32; D * D];
    for j0 in (0..D).step_by(3) {
        let mut acc = [[_mm512_setzero_ps(); D]; 3];
        for oy in 0..h {
            for ox0 in (0..w).step_by(16) {
                let valid = crate::cpu::bf16::first_lanes(w - ox0);
                // SAFETY: every load is masked to pixels of a row of `dc` or of `x` (the
                // pointer of a masked-off first lane may lie before the row: never read).
                unsafe {
                    let at = oy * w + ox0;
                    let dcv: [__m512; 3] = std::array::from_fn(|r| {
                        _mm512_maskz_loadu_ps(valid, dc.as_ptr().add((j0 + r) * npix + at))
                    });
                    for a in 0..3 {
                        let Some(iy) = (oy + a).checked_sub(1).filter(|&iy| iy < h) else {
                            continue;
                        };
                        for b in 0..3 {
                            let mask = shifted(valid, ox0, b as isize - 1, w);
                            let src = x.as_ptr().wrapping_add(iy * w + ox0 + b).wrapping_sub(1);
                            let xv = _mm512_maskz_loadu_ps(mask, src);
                            for (acc, &d) in acc.iter_mut().zip(&dcv) {
                                acc[3 * a + b] = _mm512_fmadd_ps(d, xv, acc[3 * a + b]);
                            }
                        }
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (k, &v) in acc.iter().enumerate() {
                out[(j0 + r) * D + k] = _mm512_reduce_add_ps(v);
            }
        }
    }
    out
}

/// `dx = col2im(T^T dc)`: `mixed[k] = sum_j T(j, k) dc[j]` (16 pixels at a time, the 9 rows of
/// `dc` in registers), then each vector of `dx[iy]` the sum of its taps `k = 3 a + b`,
/// `mixed[k][iy - a + 1][ix - b + 1]`, where they lie in the image.
///
/// # Safety
/// AVX512F must be present; `dc` and `mixed` hold `9 h w` numbers, `t` 81, `dx` `h w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_grad(
    dc: &[f32],
    t: &[f32],
    (h, w): (usize, usize),
    mixed: &mut [f32],
    dx: &mut [f32],
) {
    use std::arch::x86_64::*;
    let npix = h * w;
    for p0 in (0..npix).step_by(16) {
        let valid = crate::cpu::bf16::first_lanes(npix - p0);
        // SAFETY: masked to the pixels of each row of `dc` and `mixed`.
        unsafe {
            let dcv: [__m512; D] = std::array::from_fn(|j| {
                _mm512_maskz_loadu_ps(valid, dc.as_ptr().add(j * npix + p0))
            });
            for k in 0..D {
                let mut s = _mm512_mul_ps(dcv[0], _mm512_set1_ps(t[k]));
                for (j, &d) in dcv.iter().enumerate().skip(1) {
                    s = _mm512_fmadd_ps(d, _mm512_set1_ps(t[j * D + k]), s);
                }
                _mm512_mask_storeu_ps(mixed.as_mut_ptr().add(k * npix + p0), valid, s);
            }
        }
    }
    for iy in 0..h {
        for ix0 in (0..w).step_by(16) {
            let valid = crate::cpu::bf16::first_lanes(w - ix0);
            let mut sum = _mm512_setzero_ps();
            for a in 0..3 {
                // the output row whose tap `a` reads row `iy`
                let Some(oy) = (iy + 1).checked_sub(a).filter(|&oy| oy < h) else {
                    continue;
                };
                for b in 0..3 {
                    let mask = shifted(valid, ix0, 1 - b as isize, w);
                    let src = mixed
                        .as_ptr()
                        .wrapping_add((3 * a + b) * npix + oy * w + ix0 + 1)
                        .wrapping_sub(b);
                    // SAFETY: masked to pixels of row `oy` of `mixed[k]`.
                    sum = _mm512_add_ps(sum, unsafe { _mm512_maskz_loadu_ps(mask, src) });
                }
            }
            // SAFETY: masked to the row's pixels of `dx`.
            unsafe { _mm512_mask_storeu_ps(dx.as_mut_ptr().add(iy * w + ix0), valid, sum) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_grad(_: &[f32], _: &[f32], _: (usize, usize)) -> [f32; D * D] {
    unreachable!("avx512() is false off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_grad(_: &[f32], _: &[f32], _: (usize, usize), _: &mut [f32], _: &mut [f32]) {
    unreachable!("avx512() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, s: f64) -> Vec<f64> {
        (0..n).map(|i| (i as f64 * s).sin() + 0.1).collect()
    }

    /// Both results against f64 sums written from the definitions (im2col by index, col2im by
    /// scatter), on planes narrower than a vector, one vector wide and ragged.
    #[test]
    fn equals_the_definitions_in_f64() {
        if !avx512() {
            eprintln!("skipped: this CPU has no AVX512F");
            return;
        }
        for (h, w) in [(5, 7), (4, 16), (6, 33), (3, 1)] {
            let npix = h * w;
            let (x, dc, t) = (wave(npix, 0.37), wave(D * npix, 0.91), wave(D * D, 1.3));
            // cols[k][p] = x at pixel p shifted by tap k
            let col = |k: usize, oy: usize, ox: usize| -> f64 {
                let (iy, ix) = ((oy + k / 3) as isize - 1, (ox + k % 3) as isize - 1);
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    0.0
                } else {
                    x[iy as usize * w + ix as usize]
                }
            };
            let mut want_dt = vec![0f64; D * D];
            let mut want_dx = vec![0f64; npix];
            for (oy, ox) in (0..h).flat_map(|oy| (0..w).map(move |ox| (oy, ox))) {
                let p = oy * w + ox;
                for j in 0..D {
                    for k in 0..D {
                        want_dt[j * D + k] += dc[j * npix + p] * col(k, oy, ox);
                    }
                }
                for k in 0..D {
                    let (iy, ix) = ((oy + k / 3) as isize - 1, (ox + k % 3) as isize - 1);
                    if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                        let m: f64 = (0..D).map(|j| t[j * D + k] * dc[j * npix + p]).sum();
                        want_dx[iy as usize * w + ix as usize] += m;
                    }
                }
            }
            let f = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let g = Geo {
                c: 1,
                h,
                w,
                o: 1,
                kh: 3,
                kw: 3,
                s: 1,
                p: 1,
                ho: h,
                wo: w,
            };
            let mut dx = vec![f32::NAN; npix];
            let dt = channel((&f(&x)[..], &f(&dc)[..], &f(&t)[..]), &g, Some(&mut dx[..]))
                .expect("applies");
            for (name, got, want) in [("dT", &dt, &want_dt), ("dx", &dx, &want_dx)] {
                for (i, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{h}x{w} {name}[{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// Other geometries are left to the general path.
    #[test]
    fn declines_other_convs() {
        let g = Geo {
            c: 1,
            h: 4,
            w: 4,
            o: 1,
            kh: 3,
            kw: 3,
            s: 2,
            p: 1,
            ho: 2,
            wo: 2,
        };
        let v = vec![0f32; 200];
        assert!(channel((&v[..16], &v[..], &v[..81]), &g, None).is_none());
        let v64 = vec![0f64; 200];
        let g1 = Geo {
            s: 1,
            ho: 4,
            wo: 4,
            ..g
        };
        assert!(channel((&v64[..16], &v64[..], &v64[..81]), &g1, None).is_none());
    }
}
