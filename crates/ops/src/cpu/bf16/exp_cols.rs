//! Attention's probabilities computed from its scores and packed as a left operand in one
//! pass.

use super::pack::panel_buffer;
use super::round::pair16;
use super::{first_lanes, supported, Panels, MR};

/// A block of attention's probabilities packed as a left operand ([`Panels::left_pairs`]'s
/// layout, also where AMX tiles run the products: the values they multiply are a head wide, too
/// few to repay regrouping them) as the softmax makes them, from the block's scores
/// transposed, `s_t [keys, queries]` (the product `K Q^T`): `P [queries, keys]` with
/// `P[q][k] = e^(s_t[k][q] - shift[q])` rounded to bf16, and `sums[q] +=` each query's
/// unrounded exponentials. A pair of keys is two rows of
/// `s_t`, paired lane by lane into the words of 12 queries at a time: no transposing, and the
/// probabilities are never written in f32. On the calling thread; the exponentials are
/// [`crate::cpu::fastmath::exp16`]'s.
///
/// # Panics
/// Where the CPU lacks AVX512F and AVX512BW (callers check [`supported`]).
pub(crate) fn pack_exp_cols(
    s_t: &[f32],
    (keys, queries): (usize, usize),
    shift: &[f32],
    sums: &mut [f32],
    mut out: Vec<u32>,
) -> Panels {
    assert!(supported() && s_t.len() >= keys * queries);
    assert!(shift.len() >= queries && sums.len() >= queries);
    let cp = keys.div_ceil(2);
    panel_buffer(&mut out, queries, cp, MR);
    // SAFETY: checked above.
    unsafe { exp_cols(s_t, (keys, queries), shift, sums, &mut out) };
    Panels {
        words: out,
        pairs: cp,
        len: queries,
        w: MR,
        tiled: false,
    }
}

/// [`pack_exp_cols`]'s work, 48 queries (three vectors, four panels of [`MR`] rows) at a time,
/// whose shifts and sums stay in registers: for each pair of keys, both rows' exponentials,
/// their pair words, and each panel's 12 words moved into place by a lane rotation.
///
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be present; the sizes as [`pack_exp_cols`] checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn exp_cols(
    s_t: &[f32],
    (keys, queries): (usize, usize),
    shift: &[f32],
    sums: &mut [f32],
    out: &mut [u32],
) {
    use crate::cpu::fastmath::exp16;
    use std::arch::x86_64::*;
    const STRIP: usize = 4 * MR;
    let cp = keys.div_ceil(2);
    for q0 in (0..queries).step_by(STRIP) {
        // each vector's queries (none past `queries`), and the strip's panels
        let lanes: [u16; 3] =
            std::array::from_fn(|v| first_lanes(queries.saturating_sub(q0 + 16 * v)));
        let panels = (queries - q0).div_ceil(MR).min(4);
        // SAFETY: the caller's promise; every load and store is masked to `queries` numbers of
        // `s_t`'s rows, `shift` and `sums` (a vector with no lanes there reads and writes
        // nothing), or writes a panel's `MR` words of `out`.
        unsafe {
            let at = |v: usize| q0 + 16 * v;
            let sh: [__m512; 3] = std::array::from_fn(|v| {
                _mm512_maskz_loadu_ps(lanes[v], shift.as_ptr().wrapping_add(at(v)))
            });
            let mut sum: [__m512; 3] = std::array::from_fn(|v| {
                _mm512_maskz_loadu_ps(lanes[v], sums.as_ptr().wrapping_add(at(v)))
            });
            // key `k`'s exponentials of vector `v` (zeros past `keys` and `queries`)
            let exps = |k: usize, v: usize| {
                if k >= keys {
                    return _mm512_setzero_ps();
                }
                let s = _mm512_maskz_loadu_ps(lanes[v], s_t.as_ptr().add(k * queries + at(v)));
                _mm512_maskz_mov_ps(lanes[v], exp16(_mm512_sub_ps(s, sh[v])))
            };
            for t in 0..cp {
                let mut words = [_mm512_setzero_si512(); 3];
                for v in (0..3).filter(|&v| lanes[v] != 0) {
                    let (lo, hi) = (exps(2 * t, v), exps(2 * t + 1, v));
                    sum[v] = _mm512_add_ps(_mm512_add_ps(sum[v], lo), hi);
                    words[v] = pair16(lo, hi);
                }
                // panel i holds the strip's queries 12 i..12 i + 12: lanes 12 i.. of the three
                let [w0, w1, w2] = words;
                let by_panel = [
                    w0,
                    _mm512_alignr_epi32::<12>(w1, w0),
                    _mm512_alignr_epi32::<8>(w2, w1),
                    _mm512_alignr_epi32::<4>(w2, w2),
                ];
                for (i, &w) in by_panel.iter().enumerate().take(panels) {
                    let dst = out.as_mut_ptr().add(((q0 / MR + i) * cp + t) * MR);
                    _mm512_mask_storeu_epi32(dst.cast(), first_lanes(MR), w);
                }
            }
            for (v, &sum) in sum.iter().enumerate() {
                _mm512_mask_storeu_ps(sums.as_mut_ptr().wrapping_add(at(v)), lanes[v], sum);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_cols(_: &[f32], _: (usize, usize), _: &[f32], _: &mut [f32], _: &mut [u32]) {
    unreachable!("supported() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::wave;

    /// The probabilities' panels hold `e^(s_t[k][q] - shift[q])` at query `q`'s row and key
    /// pair `k / 2`, zeros past the keys and queries, and the sums gain each query's
    /// exponentials: for strips of 48 queries whole, ragged and shorter than a vector; in pair
    /// panels even where the AMX tiles take the other left operands.
    #[test]
    fn probabilities_pack_where_the_panels_want_them() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // pair panels also where the tiles run the products (which only a head's width of
        // values multiplies: tiles would regroup them)
        crate::cpu::bf16::amx::forced(probabilities_pack);
    }

    /// [`probabilities_pack_where_the_panels_want_them`]'s cases.
    fn probabilities_pack() {
        for (keys, queries) in [(7, 1), (33, 13), (8, 48), (5, 50), (12, 96), (9, 100)] {
            let s_t: Vec<f32> = wave(keys * queries, 0.31).iter().map(|x| x - 2.0).collect();
            let shift = wave(queries, 0.7);
            let mut sums = vec![0.5f32; queries];
            let cp = keys.div_ceil(2);
            let garbage = vec![u32::MAX; queries.div_ceil(MR) * cp * MR + 7];
            let p = pack_exp_cols(&s_t, (keys, queries), &shift, &mut sums, garbage);
            assert!(!p.tiled);
            let e = |k: usize, q: usize| {
                if k < keys {
                    ((s_t[k * queries + q] - shift[q]) as f64).exp()
                } else {
                    0.0
                }
            };
            let half =
                |w: u32, high: bool| f32::from_bits(if high { w & 0xffff_0000 } else { w << 16 });
            for q in 0..queries.next_multiple_of(MR) {
                for t in 0..cp {
                    let w = p.word(q / MR, t, q % MR);
                    for (high, k) in [(false, 2 * t), (true, 2 * t + 1)] {
                        let want = if q < queries { e(k, q) } else { 0.0 };
                        let got = half(w, high) as f64;
                        assert!(
                            (got - want).abs() <= want * 2f64.powi(-8),
                            "{keys}x{queries}: query {q} key {k}: {got} vs {want}"
                        );
                    }
                }
            }
            for (q, &got) in sums.iter().enumerate() {
                let want = 0.5 + (0..keys).map(|k| e(k, q)).sum::<f64>();
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * want,
                    "sum {q}: {got} vs {want}"
                );
            }
        }
    }
}
