//! f32 functions written so that loops over them vectorise (no calls into libm, no
//! float-to-int casts, which Rust saturates and so scalarises), and [`simd_dispatch!`], which
//! compiles such a loop for AVX-512 and AVX2 and picks one at run time (the crate itself is built
//! for baseline x86-64).
//!
//! Also partial sums in lanes ([`lane_sum`]), for the norms' statistics.
//!
//! Accuracy is that of f32 itself or close to it (each function says), enough for activations
//! and softmax weights; f64 work keeps std's functions.

use super::Float;

/// `e^x` for `x <= 0`: Cody-Waite range reduction to `r` in `[-ln2/2, ln2/2]`, Cephes' degree-6
/// polynomial for `e^r`, and `2^n` through the exponent bits. Relative error about 1e-7, like
/// `expf`; inputs below -87 give about 1e-38 (weights that small are zero in any sum).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
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
    // shifting those into the exponent field gives 2^n.
    let biased = (n + 8_388_735.0).to_bits(); // 2^23 + 127 + n
    e * f32::from_bits(biased << 23)
}

/// `e^x` of 16 numbers (not NaN) for the bf16 paths, whose products round what they read to
/// bf16 (2^-9) anyway: `2^n 2^f` with `n` the integer nearest `x log2 e`, a degree-5 fit of
/// `2^f` on `[-1/2, 1/2]` (relative error 2.3e-7 in f32, like [`exp_neg`]'s 1e-7: a degree-4
/// fit's 2.7e-6 flipped the bf16 rounding of 0.14% of attention's probabilities), and
/// `vscalefps` for `2^n`: 13 instructions where [`exp_neg`] takes about 18. Below -87 the results are
/// subnormal, below -104 zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // a weighted least-squares fit (Lawson's iteration toward minimax) of 2^f, f32 coefficients
    const C: [f32; 6] = [
        1.000_000_1,
        0.693_146_94,
        0.240_221_2,
        0.055_507_13,
        0.009_675_542,
        0.001_327_647_2,
    ];
    // log2 e as f32 plus the rest, and x log2 e as t + tl, tl the product's rounding error and
    // x times the rest: without them t's error (|t| 2^-24, and log2 e's 1.3e-8) would add up
    // to |x| 2e-8 to the result's relative error
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let rest = _mm512_set1_ps(1.925_963e-8);
    // below -110, 2^n underflows to zero whatever the polynomial
    let x = _mm512_max_ps(x, _mm512_set1_ps(-110.0));
    let t = _mm512_mul_ps(x, log2e);
    let tl = _mm512_fmadd_ps(x, rest, _mm512_fmsub_ps(x, log2e, t));
    // to nearest, exceptions suppressed
    let n = _mm512_roundscale_ps::<0x08>(t);
    let f = _mm512_add_ps(_mm512_sub_ps(t, n), tl);
    let mut p = _mm512_set1_ps(C[5]);
    for &c in C[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `1 / (1 + e^-x)`, from `e^-|x|` so the exponent is never positive (relative error about 2e-7;
/// below -87 about 1e-38, as [`exp_neg`]).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// `Phi(x)`, the standard normal CDF, as `1 - q` or `q` with `q = erfc(|x| / sqrt 2) / 2`, and
/// erfc from the Chebyshev fit of Numerical Recipes (`erfcc`, fractional error below 1.2e-7
/// for every argument, so the lower tail keeps its relative accuracy).
#[inline(always)]
pub(crate) fn normal_cdf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77_f32;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p * t + c;
    }
    // The exponent is <= 0 up to rounding (erfc(z) <= 1 / (1 + z / 2) = t).
    let q = 0.5 * t * exp_neg(p - z * z);
    if x >= 0.0 {
        1.0 - q
    } else {
        q
    }
}

/// `phi(x)`, the standard normal density (relative error about 1e-7).
#[inline(always)]
pub(crate) fn normal_pdf(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    FRAC_1_SQRT_2PI * exp_neg(-0.5 * x * x)
}

/// Partial sums per lane: loops over `LANES` independent accumulators vectorise, where one
/// running sum (a chain of dependent adds) cannot.
pub(crate) const LANES: usize = 16;

/// The sum of `f(v)` over `v` in f64, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_sum<T: Float>(v: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let to = |x: T| x.to_f64().unwrap_or(0.0);
    let mut lanes = [0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(to(x));
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f(to(x))).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Mean and `1 / sqrt(var + eps)` of `v`, accumulated in f64 ([`lane_sum`]).
#[inline(always)]
pub(crate) fn mean_rstd<T: Float>(v: &[T], eps: f64) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = lane_sum(v, |x| x) / n;
    let var = lane_sum(v, |x| (x - mean) * (x - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Defines `fn $name(args) -> ret` that runs `$body` (an `#[inline(always)]` function of the
/// same signature) compiled for AVX-512 or AVX2 + FMA when the CPU has them, else as built.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn exp16_is_within_its_stated_error() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        // normal results (above -87), and a few points of the reduction's edges
        let xs: Vec<f32> = (0..199_984)
            .map(|i| -87.0 + i as f32 * 87.0 / 199_984.0)
            .chain([0.0, -1e-30, 1e-6, 0.5, -0.5 * std::f32::consts::LN_2])
            .chain([-0.5 * std::f32::consts::LN_2 + 1e-7; 11])
            .collect();
        assert!(xs.len().is_multiple_of(16));
        let mut worst = 0f64;
        for chunk in xs.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: AVX512F checked above; 16 numbers in, 16 out.
            unsafe {
                use std::arch::x86_64::*;
                let e = exp16(_mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_ps(out.as_mut_ptr(), e);
            }
            for (&x, &e) in chunk.iter().zip(&out) {
                let want = (x as f64).exp();
                worst = worst.max((e as f64 - want).abs() / want);
            }
        }
        // 2.3e-7 from the fit and f32's evaluation of it
        assert!(worst < 4e-7, "worst relative error {worst}");
        // far below: zero, not garbage
        let mut out = [1f32; 16];
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_set1_ps(-1e30)));
        }
        assert!(out.iter().all(|&e| e == 0.0));
    }

    #[test]
    fn exp_is_as_accurate_as_expf() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37);
    }

    #[test]
    fn the_sigmoid_holds_to_f32_accuracy() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = (-87.0 + 174.0 * i as f64 / 200_000.0) as f32 as f64;
            let want = 1.0 / (1.0 + (-x).exp());
            worst = worst.max((sigmoid(x as f32) as f64 - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        // below -87 the exponential stops at about 1e-38 (as in exp_neg)
        assert!(sigmoid(-100.0) < 1e-37 && sigmoid(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn the_normal_cdf_and_density_hold_to_f32_accuracy() {
        let (mut cdf_abs, mut cdf_rel_tail, mut pdf_rel) = (0f64, 0f64, 0f64);
        for i in 0..=200_000 {
            let x = (-10.0 + 20.0 * i as f64 / 200_000.0) as f32 as f64;
            let want_cdf = 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2);
            let got_cdf = normal_cdf(x as f32) as f64;
            cdf_abs = cdf_abs.max((got_cdf - want_cdf).abs());
            if x < -1.0 {
                // the lower tail keeps relative accuracy (no 1 - q cancellation there)
                cdf_rel_tail = cdf_rel_tail.max((got_cdf - want_cdf).abs() / want_cdf);
            }
            let want_pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let got_pdf = normal_pdf(x as f32) as f64;
            pdf_rel = pdf_rel.max((got_pdf - want_pdf).abs() / want_pdf);
        }
        assert!(cdf_abs < 2e-7, "cdf absolute error {cdf_abs}");
        // in the far tails the f32 rounding of x^2 / 2 (up to 50 here) dominates: 6e-8 of 50
        assert!(
            cdf_rel_tail < 1e-5,
            "cdf lower-tail relative error {cdf_rel_tail}"
        );
        assert!(pdf_rel < 3e-6, "pdf relative error {pdf_rel}");
        assert_eq!(normal_cdf(f32::INFINITY), 1.0);
        assert_eq!(normal_cdf(f32::NEG_INFINITY), 0.0);
    }
}
