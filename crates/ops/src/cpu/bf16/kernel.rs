//! The micro-kernels: an `MR x NR` block of the result in registers, `vdpbf16ps` over pairs of
//! `k`.

use super::{first_lanes, MR, NR};

/// Where a micro-kernel writes: `c (+)= scale * sum a b` for the first `rows x cols` of its
/// block, rows `rs` apart (added to what is there when `accumulate`).
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) c: *mut f32,
    pub(super) rs: usize,
    /// `(rows, cols)`.
    pub(super) block: (usize, usize),
    pub(super) scale: f32,
    pub(super) accumulate: bool,
}

/// One `MR x 16V` block over `pairs` pairs of `k` (`V` vectors of 16 columns, 1 or 2), into
/// `out` (the packed panels are zero past the matrix; `b`'s pairs are `NR` words apart
/// whatever `V`).
///
/// # Safety
/// AVX512-BF16 and AVX512F must be present; `a` holds `pairs * MR` pair words, `b`
/// `pairs * NR`; `out.c` is valid for `rows` rows of `cols` writes, `rs` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn kernel<const V: usize>(a: &[u32], b: &[u32], pairs: usize, out: Out) {
    let Out {
        c,
        rs,
        scale,
        accumulate,
        block: (rows, cols),
    } = out;
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    for q in 0..pairs {
        // SAFETY: within the panels (the caller's promise); unaligned loads.
        unsafe {
            let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
            for (h, bv) in bv.iter_mut().enumerate() {
                let b = _mm512_loadu_si512(pb.add(q * NR + 16 * h).cast());
                *bv = std::mem::transmute::<__m512i, __m512bh>(b);
            }
            let arow = pa.add(q * MR).cast::<i32>();
            for (r, acc) in acc.iter_mut().enumerate() {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(arow.add(r).read_unaligned()));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbf16_ps(*acc, x, bv);
                }
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
            let mask = first_lanes(lanes);
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

/// [`kernel`] for a block of at most 8 columns, on 256-bit vectors: where a 512-bit
/// instruction runs as two halves (Zen 4), each step costs half of `kernel::<1>`'s, whose
/// second half would multiply the panel's zero padding.
///
/// # Safety
/// As [`kernel`], and AVX512VL must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(super) unsafe fn kernel8(a: &[u32], b: &[u32], pairs: usize, out: Out) {
    let Out {
        c,
        rs,
        scale,
        accumulate,
        block: (rows, cols),
    } = out;
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); MR];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    for q in 0..pairs {
        // SAFETY: within the panels (the caller's promise); unaligned loads.
        unsafe {
            let bv: __m256bh = std::mem::transmute(_mm256_loadu_si256(pb.add(q * NR).cast()));
            let arow = pa.add(q * MR).cast::<i32>();
            for (r, acc) in acc.iter_mut().enumerate() {
                let x: __m256bh =
                    std::mem::transmute(_mm256_set1_epi32(arow.add(r).read_unaligned()));
                *acc = _mm256_dpbf16_ps(*acc, x, bv);
            }
        }
    }
    let (s, mask) = (_mm256_set1_ps(scale), first_lanes(cols.min(8)) as __mmask8);
    for (r, v) in acc.iter().enumerate().take(rows) {
        // SAFETY: the first `cols` columns of row `r` lie within the block.
        unsafe {
            let p = c.add(r * rs);
            let mut y = _mm256_mul_ps(*v, s);
            if accumulate {
                y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(mask, p));
            }
            _mm256_mask_storeu_ps(p, mask, y);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn kernel8(_: &[u32], _: &[u32], _: usize, _: Out) {
    unreachable!("supported() is false off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn kernel<const V: usize>(_: &[u32], _: &[u32], _: usize, _: Out) {
    unreachable!("supported() is false off x86_64")
}
