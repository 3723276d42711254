//! Rounding f32 to bf16 as the CPU's `vcvtne2ps2bf16` does, a number, a pair or 16 lanes at
//! a time, and the pair words the products read.

use super::supported;

/// `x` rounded to bf16 in the high half of the result (the low half is garbage), as
/// `vcvtne2ps2bf16` rounds it (Intel SDM, "VCVTNE2PS2BF16"), so that the scalar and vector
/// packers write the same bits: to nearest, ties to even; a subnormal flushed to a zero of its
/// sign (`vdpbf16ps` reads subnormal operands as zero anyway); a NaN truncated, its quiet bit
/// set. Branch-free, so that loops over it vectorise.
#[inline(always)]
fn round_high(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let special = if x.is_nan() {
        b | 0x0040_0000
    } else {
        b & 0x8000_0000
    };
    if x.is_normal() || x.is_infinite() {
        // infinities: adding under 0x8000 leaves their high half as it is
        rounded
    } else {
        special
    }
}

/// Two numbers rounded to bf16 as one pair word: `lo` in the low half, `hi` in the high half
/// (the order `vdpbf16ps` reads a pair in).
#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    (round_high(hi) & 0xffff_0000) | (round_high(lo) >> 16)
}

/// `x` rounded to bf16, as an f32: what a product of bf16 operands reads for it.
#[cfg(test)]
pub(crate) fn round(x: f32) -> f32 {
    f32::from_bits(round_high(x) & 0xffff_0000)
}

/// `x` rounded to bf16, as its bits.
#[cfg(test)]
pub(super) fn to_bf16(x: f32) -> u16 {
    (round_high(x) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[cfg(test)]
pub(super) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `Packed::pair_run` for f32: 16 words at a time with the CPU's conversion ([`pair16`])
/// where it has the instructions, else a word at a time.
pub(crate) fn pair_run(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    let n = out.len();
    assert!(lo.len() >= n && hi.len() >= n);
    if supported() {
        // SAFETY: checked above.
        unsafe { pair_run_avx512(lo, hi, out) };
        return;
    }
    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
        *o = pair(l, h);
    }
}

/// [`pair_run`]'s vector loop.
///
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be present; `lo` and `hi` hold `out.len()` numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_run_avx512(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    for j in (0..out.len()).step_by(16) {
        let mask = first_lanes(out.len() - j);
        // SAFETY: masked to the run's `out.len()` numbers.
        unsafe {
            let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(j));
            let h = _mm512_maskz_loadu_ps(mask, hi.as_ptr().add(j));
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j).cast(), mask, pair16(l, h));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pair_run_avx512(_: &[f32], _: &[f32], _: &mut [u32]) {
    unreachable!("supported() is false off x86_64")
}

/// 32 numbers rounded to bf16 (as [`pair`] rounds them) as 16 pair words: one
/// `vcvtne2ps2bf16`, whose 32 results in order are the pair words (low half first).
///
/// # Safety
/// AVX512F and AVX512-BF16 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn pairs16(x: &[f32; 32], out: &mut [u32; 16]) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's promise; unaligned loads and store of whole arrays.
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        );
        let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.as_mut_ptr().cast(), words);
    }
}

/// The mask of a vector's first `n` lanes (`n <= 16`).
pub(crate) fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1 << n) - 1
    }
}

/// 16 numbers rounded to bf16 (as `round` rounds them), as f32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(crate) fn round16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: a bf16 vector and a 256-bit integer one have the same size.
    let bits: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(v)) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

/// 16 pair words of `lo` and `hi` rounded to bf16 ([`pair`] of each lane): both rounded by
/// one `vcvtne2ps2bf16` (`lo` in the low 16 halves, `hi` in the high ones), then interleaved.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(crate) fn pair16(
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // word j takes half j (`lo[j]`) low and half 16 + j (`hi[j]`) high
    const INTERLEAVE: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 16 {
            idx[2 * j] = j as u16;
            idx[2 * j + 1] = 16 + j as u16;
            j += 1;
        }
        idx
    };
    // SAFETY: a bf16 vector and an integer one have the same size; the index is 64 bytes.
    unsafe {
        let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_permutexvar_epi16(_mm512_loadu_si512(INTERLEAVE.as_ptr().cast()), halves)
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn pairs16(_: &[f32; 32], _: &mut [u32; 16]) {
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

    /// Bit patterns at rounding's edges: ties (both ways), carries, the largest finite number,
    /// infinities, NaNs, subnormals and signed zeros.
    const EDGES: [u32; 15] = [
        0x3f80_8000u32, // 1 + 2^-8: a tie, rounds to even (down)
        0x3f81_8000,    // a tie that rounds up
        0x3f80_8001,
        0x3f80_7fff,
        0x7f7f_ffff, // the largest finite: rounds to infinity
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0001,
        0xffa0_0000, // a signalling NaN stays NaN
        0x7f80_0001, // so does one whose payload rounding would carry into infinity
        0x0000_0001, // subnormals: flushed to zero, as the hardware's conversion does
        0x8000_8000,
        0x0000_0000,
        0x8000_0000,
        0x3fff_ffff,
    ];

    /// The scalar rounding is the instruction's (Intel SDM, VCVTNE2PS2BF16): nearest even,
    /// subnormals to a zero of their sign, NaNs truncated and quieted, overflow to infinity.
    #[test]
    fn scalar_rounding_is_the_instructions() {
        let r = |b: u32| to_bf16(f32::from_bits(b));
        assert_eq!(r(0x3f80_8000), 0x3f80);
        assert_eq!(r(0x3f81_8000), 0x3f82);
        assert_eq!(r(0x7f7f_ffff), 0x7f80);
        assert_eq!(r(0xff80_0000), 0xff80);
        assert_eq!(r(0x0000_0001), 0x0000);
        assert_eq!(r(0x807f_ffff), 0x8000);
        assert_eq!(r(0x0080_0000), 0x0080, "the smallest normal stays");
        assert_eq!(r(0x7f80_0001), 0x7fc0);
        assert_eq!(r(0xffa0_ffff), 0xffe0);
    }

    /// Each vector rounding ([`pairs16`], [`pair16`], [`round16`]) equals the scalar one on
    /// [`EDGES`], each number in the low and the high half of a pair.
    #[test]
    fn vector_rounding_equals_scalar_rounding() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let x: Vec<f32> = (0..32)
            .map(|i| f32::from_bits(EDGES[i % EDGES.len()] ^ ((i as u32 / 14) << 31)))
            .collect();
        let mut got = [0u32; 16];
        // SAFETY: `supported()` holds.
        unsafe { pairs16(x.as_slice().try_into().unwrap(), &mut got) };
        for (j, &g) in got.iter().enumerate() {
            assert_eq!(
                g,
                pair(x[2 * j], x[2 * j + 1]),
                "pair {j}: {:?}",
                &x[2 * j..2 * j + 2]
            );
        }
        use std::arch::x86_64::*;
        let (lo, hi) = (&x[..16], &x[16..]);
        // SAFETY: as above; 16 numbers each.
        let (words, rounded): ([u32; 16], [f32; 16]) = unsafe {
            let (l, h) = (_mm512_loadu_ps(lo.as_ptr()), _mm512_loadu_ps(hi.as_ptr()));
            (
                std::mem::transmute::<__m512i, [u32; 16]>(pair16(l, h)),
                std::mem::transmute::<__m512, [f32; 16]>(round16(l)),
            )
        };
        for j in 0..16 {
            assert_eq!(words[j], pair(lo[j], hi[j]), "lane {j}");
            assert_eq!(rounded[j].to_bits(), round(lo[j]).to_bits(), "lane {j}");
        }
        let mut run = [0u32; 13];
        pair_run(&x[..13], &x[19..], &mut run);
        for (j, &w) in run.iter().enumerate() {
            assert_eq!(w, pair(x[j], x[19 + j]), "run word {j}");
        }
    }
}
