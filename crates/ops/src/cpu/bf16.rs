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
//! walks `k` two at a time; the result is written once per block of `k` ([`KC`]). Only products
//! large enough to repay the packing take this path ([`worth_it`]: `k >= 256`, `m, n >= 64`).

use super::matmul::{Data, Dst, Mat};

/// Rows of the micro-kernel's block.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's block (two vectors of 16 f32).
pub(crate) const NR: usize = 32;
/// The most `k` per block (even): depths up to SD's 1,280 run whole, so each block of the
/// result is written once; deeper products in equal blocks (a `KC x NR` panel of `b` is 80 KB
/// of bf16, in L2). 512 wrote SDXL's linear outputs three times over, 10-25% of their rate.
pub(crate) const KC: usize = 1280;
/// Bytes of `a`'s rows a block holds (in L2, 1 MB a core on Zen 4 and Zen 5, beside `b`'s
/// panel or chunk): SD's 16x16 level's 256 tokens at depth 1,280 in one block, so each panel of
/// a streamed weight meets all of them once.
const A_BLOCK_BYTES: usize = 672 << 10;

/// The environment variable that turns bf16 products on (`1`) for a process that does not
/// choose itself (benchmarks, tests); `atomtune --dtype bf16` turns them on with [`set_enabled`].
pub const VAR: &str = "ATOMTUNE_CPU_BF16";

/// The switch: on by [`set_enabled`], else by `ATOMTUNE_CPU_BF16=1`; off by default.
static SWITCH: super::switch::Switch = super::switch::Switch::new(VAR, false, "bf16 products");

/// Turns bf16 products on or off for the whole process.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether bf16 products are turned on: by [`set_enabled`], else by `ATOMTUNE_CPU_BF16=1`.
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Whether the CPU has the instructions (AVX512-BF16 with AVX512F, AVX512BW and AVX512VL, as
/// every CPU with AVX512-BF16 has).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `--dtype auto` runs bf16 products on the CPU: where it has the instructions, unless
/// `ATOMTUNE_CPU_BF16=0` keeps it in f32.
pub fn auto() -> bool {
    supported() && std::env::var(VAR).as_deref() != Ok("0")
}

/// Whether f32 products run in bf16 now: turned on and supported.
pub fn active() -> bool {
    enabled() && supported()
}

/// Whether the products of a weight of these dims (a linear's `[out, in]`, a conv's `[o, c,
/// kh, kw]`) take the bf16 kernel when it is on, for inputs of 64 positions (tokens, pixels) or
/// more: they round it to bf16 as they pack it, so a weight made for them (one baked for
/// inference) may be kept in bf16 at no cost in accuracy.
pub fn takes_weight(dims: &[usize]) -> bool {
    match *dims {
        [out, inp] => worth_it((64, inp), (inp, out)),
        [o, c, kh, kw] => worth_it((o, c * kh * kw), (c * kh * kw, 64)),
        _ => false,
    }
}

/// Whether a product of `a (m x k)` and `b (k x n)` gains from bf16: packing converts every
/// operand once, which a product repays only when each number takes part in enough
/// multiply-adds. Attention's products (`k` or `n` the head width, 40-160) stay f32.
pub(crate) fn worth_it((m, k): (usize, usize), (_, n): (usize, usize)) -> bool {
    m >= 64 && n >= 64 && k >= 256
}

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
fn pair(lo: f32, hi: f32) -> u32 {
    (round_high(hi) & 0xffff_0000) | (round_high(lo) >> 16)
}

/// `x` rounded to bf16, as an f32: what a product of bf16 operands reads for it.
#[cfg(test)]
pub(crate) fn round(x: f32) -> f32 {
    f32::from_bits(round_high(x) & 0xffff_0000)
}

/// `x` rounded to bf16, as its bits.
#[cfg(test)]
fn to_bf16(x: f32) -> u16 {
    (round_high(x) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[cfg(test)]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// What [`pack`] reads: f32 numbers, rounded to bf16 as they are packed, or bf16 numbers (a
/// weight kept in bf16), packed as they are.
trait Packed: Copy + Send + Sync {
    const ZERO: Self;

    /// `lo` and `hi` as one pair word.
    fn pair(lo: Self, hi: Self) -> u32;

    /// 32 consecutive numbers as 16 pair words (`simd`: the CPU has the bf16 products: [`supported`]).
    fn pairs16(run: &[Self; 32], out: &mut [u32; 16], simd: bool);

    /// The pair words of `lo[i]` and `hi[i]` into `out` (as long as `lo`): two rows of a
    /// matrix read along their run.
    fn pair_run(lo: &[Self], hi: &[Self], out: &mut [u32]) {
        for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
            *o = Self::pair(l, h);
        }
    }

    /// The pair words of `lo[j]` and `hi[j]` (`hi` absent: zeros) dealt out to panels `w`
    /// words each: word `j` to `out + (j / w) * stride + j % w`. Pairs them into `words`, then
    /// copies `w` at a time; `simd`: the CPU has the bf16 products.
    ///
    /// # Safety
    /// `out` valid for those writes.
    unsafe fn deal(
        (lo, hi): (&[Self], Option<&[Self]>),
        out: *mut u32,
        (w, stride): (usize, usize),
        words: &mut Vec<u32>,
        _simd: bool,
    ) {
        // SAFETY: the caller's promise.
        unsafe { deal_through((lo, hi), out, (w, stride), words) }
    }
}

/// [`Packed::deal`] in two passes: the words into `words`, then `w` at a time to their panels.
///
/// # Safety
/// As [`Packed::deal`].
unsafe fn deal_through<S: Packed>(
    (lo, hi): (&[S], Option<&[S]>),
    out: *mut u32,
    (w, stride): (usize, usize),
    words: &mut Vec<u32>,
) {
    words.resize(lo.len(), 0);
    match hi {
        Some(hi) => S::pair_run(lo, hi, words),
        None => words
            .iter_mut()
            .zip(lo)
            .for_each(|(o, &l)| *o = S::pair(l, S::ZERO)),
    }
    for (p, run) in words.chunks(w).enumerate() {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(out.add(p * stride), run.len()) }
            .copy_from_slice(run);
    }
}

impl Packed for f32 {
    const ZERO: f32 = 0.0;

    #[inline(always)]
    fn pair(lo: f32, hi: f32) -> u32 {
        pair(lo, hi)
    }

    #[inline(always)]
    fn pairs16(run: &[f32; 32], out: &mut [u32; 16], simd: bool) {
        if simd {
            // SAFETY: `simd` says the CPU has the instructions.
            unsafe { pairs16(run, out) }
        } else {
            for (o, two) in out.iter_mut().zip(run.chunks_exact(2)) {
                *o = pair(two[0], two[1]);
            }
        }
    }

    fn pair_run(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        pair_run(lo, hi, out)
    }

    unsafe fn deal(
        (lo, hi): (&[f32], Option<&[f32]>),
        out: *mut u32,
        (w, stride): (usize, usize),
        words: &mut Vec<u32>,
        simd: bool,
    ) {
        // SAFETY: the caller's promise; `simd` says the CPU has the instructions.
        unsafe {
            if simd {
                deal_avx512((lo, hi), out, (w, stride))
            } else {
                deal_through((lo, hi), out, (w, stride), words)
            }
        }
    }
}

/// [`Packed::deal`] for f32 in one vectorised pass: 16 words at a time rounded, paired and
/// stored straight into their panel (masked at a panel's end), where pairing into a buffer
/// and copying `w` words at a time took two passes and a copy call per panel.
///
/// # Safety
/// As [`Packed::deal`]; AVX512F, AVX512BW and AVX512-BF16 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn deal_avx512(
    (lo, hi): (&[f32], Option<&[f32]>),
    out: *mut u32,
    (w, stride): (usize, usize),
) {
    use std::arch::x86_64::*;
    let n = lo.len();
    for (p, j0) in (0..n).step_by(w).enumerate() {
        let len = w.min(n - j0);
        let mut c = 0;
        while c < len {
            let lanes = (len - c).min(16);
            let mask = first_lanes(lanes);
            // SAFETY: lanes `j0 + c..j0 + c + lanes` lie within the rows; the caller's
            // promise for `out`.
            unsafe {
                let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(j0 + c));
                let h = match hi {
                    Some(hi) => _mm512_maskz_loadu_ps(mask, hi.as_ptr().add(j0 + c)),
                    None => _mm512_setzero_ps(),
                };
                let words = pair16(l, h);
                _mm512_mask_storeu_epi32(out.add(p * stride + c).cast(), mask, words);
            }
            c += lanes;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn deal_avx512(_: (&[f32], Option<&[f32]>), _: *mut u32, _: (usize, usize)) {
    unreachable!("supported() is false off x86_64")
}

/// [`Packed::pair_run`] for f32: 16 words at a time with the CPU's conversion ([`pair16`])
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

impl Packed for half::bf16 {
    const ZERO: half::bf16 = half::bf16::ZERO;

    #[inline(always)]
    fn pair(lo: half::bf16, hi: half::bf16) -> u32 {
        (hi.to_bits() as u32) << 16 | lo.to_bits() as u32
    }

    #[inline(always)]
    fn pairs16(run: &[half::bf16; 32], out: &mut [u32; 16], _: bool) {
        // a run of bf16 numbers is its pair words already (little-endian: `lo` first)
        for (o, two) in out.iter_mut().zip(run.chunks_exact(2)) {
            *o = Self::pair(two[0], two[1]);
        }
    }
}

/// A seen `rows x cols` matrix packed in panels of `w` rows as pair words: panel `p`, pair `q`
/// of columns, row `r` of the panel at `(p * cp + q) * w + r` (`cp`: column pairs, rounded up),
/// zero past the matrix. Panels are packed in parallel; rows or columns adjacent in memory are
/// read along their run.
fn pack(m: &Mat<'_, f32>, w: usize, out: Vec<u32>) -> (Vec<u32>, usize) {
    match m.data {
        Data::Plain(d) => pack_from(d, m, w, out),
        Data::Bf16(d) => pack_from(d, m, w, out),
    }
}

/// [`pack`] of `m`, whose numbers are `d`.
fn pack_from<S: Packed>(
    d: &[S],
    m: &Mat<'_, f32>,
    w: usize,
    mut out: Vec<u32>,
) -> (Vec<u32>, usize) {
    debug_assert!(w <= 32);
    use rayon::prelude::*;
    let (rows, cols) = m.shape();
    let (cs, rs) = m.strides();
    let cp = cols.div_ceil(2);
    panel_buffer(&mut out, rows, cp, w);
    let parallel = rows * cols >= 1 << 16;
    if rs == 1 {
        // Rows adjacent: each pair of columns is two runs of `rows` numbers, paired along the
        // run into `words` (vectorised) and dealt out to the panels, `w` words each (pairs in
        // parallel: they write apart).
        let (dst, simd) = (SendPtr(out.as_mut_ptr()), supported());
        let pack_pair = |words: &mut Vec<u32>, q: usize| {
            let j = 2 * q;
            let lo = &d[j * cs..j * cs + rows];
            let hi = (j + 1 < cols).then(|| &d[(j + 1) * cs..(j + 1) * cs + rows]);
            // SAFETY: pair `q` of every panel (`w` words, `cp * w` apart) is written only by
            // this task; `out` holds every panel.
            unsafe { S::deal((lo, hi), dst.get().add(q * w), (w, cp * w), words, simd) };
        };
        if parallel {
            (0..cp)
                .into_par_iter()
                .with_min_len(8)
                .for_each_init(Vec::new, pack_pair);
        } else {
            let mut words = Vec::new();
            (0..cp).for_each(|q| pack_pair(&mut words, q));
        }
        return (out, cp);
    }
    let simd = supported();
    let pack_panel = |(p, panel): (usize, &mut [u32])| {
        let (r0, r_end) = (p * w, (rows - p * w).min(w));
        // a `Mat` runs along its rows or its columns: columns were handled above
        debug_assert_eq!(cs, 1);
        {
            // each row is a run of `cols` numbers: 16 pairs of each row at a time into a tile
            // (vectorised), then the tile out transposed, `w` words in a row
            const T: usize = 16;
            let mut tile = [[0u32; T]; 32];
            for q0 in (0..cp).step_by(T) {
                let tq = T.min(cp - q0);
                for (r, words) in tile.iter_mut().enumerate().take(r_end) {
                    let start = (r0 + r) * rs + 2 * q0;
                    let run = &d[start..start + (2 * tq).min(cols - 2 * q0)];
                    match <&[S; 2 * T]>::try_from(run) {
                        Ok(run) => S::pairs16(run, words, simd),
                        Err(_) => pairs_tail(run, words),
                    }
                }
                tile_out(&tile, (r_end, tq), &mut panel[q0 * w..], w, simd);
            }
        }
    };
    if parallel {
        out.par_chunks_mut(cp * w).enumerate().for_each(pack_panel);
    } else {
        out.chunks_mut(cp * w).enumerate().for_each(pack_panel);
    }
    (out, cp)
}

/// Sizes `out` (a buffer of an earlier product: see `Scratch`) for `rows` rows of `cp` pairs in
/// panels of `w` rows, and zeroes the last panel's rows past the matrix: the packers write every
/// other word.
fn panel_buffer(out: &mut Vec<u32>, rows: usize, cp: usize, w: usize) {
    let len = rows.div_ceil(w) * cp * w;
    if out.len() < len {
        out.resize(len, 0);
    }
    out.truncate(len);
    if !rows.is_multiple_of(w) {
        let (p, r_end) = (rows / w, rows % w);
        for q in 0..cp {
            out[(p * cp + q) * w + r_end..(p * cp + q + 1) * w].fill(0);
        }
    }
}

/// A row's last run of fewer than 32 numbers as pair words (the odd last number paired with
/// zero): the packers' scalar tail.
#[inline(always)]
fn pairs_tail<S: Packed>(run: &[S], words: &mut [u32; 16]) {
    let mut pairs = run.chunks_exact(2);
    for (o, two) in words.iter_mut().zip(pairs.by_ref()) {
        *o = S::pair(two[0], two[1]);
    }
    if let [last] = pairs.remainder() {
        words[run.len() / 2] = S::pair(*last, S::ZERO);
    }
}

/// A block of attention's probabilities packed as a left operand ([`Panels::left`]'s layout)
/// as the softmax makes them, from the block's scores transposed, `s_t [keys, queries]` (the
/// product `K Q^T`): `P [queries, keys]` with `P[q][k] = e^(s_t[k][q] - shift[q])` rounded to
/// bf16, and `sums[q] +=` each query's unrounded exponentials. A pair of keys is two rows of
/// `s_t`, paired lane by lane into the words of 12 queries at a time: no transposing, and the
/// probabilities are never written in f32. On the calling thread; the exponentials are
/// [`super::fastmath::exp16`]'s.
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
    use super::fastmath::exp16;
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

/// The first `rows` rows and `pairs` columns of `tile` into `out` transposed: column `q` at
/// `q * w` (`rows <= w`); with AVX-512 when `simd` (16x16 transposes in registers, where the
/// scalar loop moves a word at a time).
fn tile_out(
    tile: &[[u32; 16]; 32],
    (rows, pairs): (usize, usize),
    out: &mut [u32],
    w: usize,
    simd: bool,
) {
    assert!(rows <= w && pairs <= 16 && (pairs == 0 || out.len() >= (pairs - 1) * w + rows));
    if simd {
        // SAFETY: `simd` says the CPU has AVX512F; the assert bounds the writes.
        unsafe { tile_out_avx512(tile, (rows, pairs), out, w) };
        return;
    }
    for q in 0..pairs {
        for (r, o) in out[q * w..q * w + rows].iter_mut().enumerate() {
            *o = tile[r][q];
        }
    }
}

/// [`tile_out`] in AVX-512: each 16 rows of the tile transposed in registers (unpacks of 32
/// and 64 bits, then two rounds of 128-bit lane shuffles), a column stored per pair, masked to
/// the rows there are.
///
/// # Safety
/// AVX512F must be present; `out` must hold `(pairs - 1) * w + rows` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_out_avx512(
    tile: &[[u32; 16]; 32],
    (rows, pairs): (usize, usize),
    out: &mut [u32],
    w: usize,
) {
    use std::arch::x86_64::*;
    for half in 0..rows.div_ceil(16) {
        let n = (rows - 16 * half).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1 << n) - 1 };
        // SAFETY: the caller's promise; unaligned loads of whole rows.
        let r: [__m512i; 16] = std::array::from_fn(|i| unsafe {
            _mm512_loadu_si512(tile[16 * half + i].as_ptr().cast())
        });
        // rows 2i and 2i+1 interleaved: in each 128-bit lane, columns 4L..4L+1, then 4L+2..
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4j + c], lane L: rows 4j..4j+3 of column 4L + c
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (j, c) = (i / 4, i % 4);
            let (a, b) = (t[4 * j + c / 2], t[4 * j + 2 + c / 2]);
            if c % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        for c in 0..4 {
            // lanes (0, 2) and (1, 3) of rows 0..8, then of rows 8..16
            let x0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[c], u[4 + c]);
            let x1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[c], u[4 + c]);
            let y0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + c], u[12 + c]);
            let y1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + c], u[12 + c]);
            let columns = [
                (c, _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, y0)),
                (4 + c, _mm512_shuffle_i32x4::<0b10_00_10_00>(x1, y1)),
                (8 + c, _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, y0)),
                (12 + c, _mm512_shuffle_i32x4::<0b11_01_11_01>(x1, y1)),
            ];
            for (q, v) in columns {
                if q < pairs {
                    // SAFETY: words q * w + 16 * half + (0..n) lie within `out` (the promise).
                    unsafe {
                        let p = out.as_mut_ptr().add(q * w + 16 * half);
                        _mm512_mask_storeu_epi32(p.cast(), mask, v);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_out_avx512(_: &[[u32; 16]; 32], _: (usize, usize), _: &mut [u32], _: usize) {
    unreachable!("supported() is false off x86_64")
}

/// 32 numbers rounded to bf16 (as [`pair`] rounds them) as 16 pair words: one
/// `vcvtne2ps2bf16`, whose 32 results in order are the pair words (low half first).
///
/// # Safety
/// AVX512F and AVX512-BF16 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs16(x: &[f32; 32], out: &mut [u32; 16]) {
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

/// 16 numbers rounded to bf16 (as [`round`] rounds them), as f32s.
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
unsafe fn pairs16(_: &[f32; 32], _: &mut [u32; 16]) {
    unreachable!("supported() is false off x86_64")
}

/// The packing buffers of the last product on this thread, reused by the next: a fresh buffer
/// of SD 1.5's sizes (up to 60 MB) costs a zeroing pass and a page fault per 4 KB, about 3% of a
/// sampling step. A product started while another is packing on the same thread (a rayon task
/// run while waiting) finds the slot empty and allocates its own.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The left operand's buffer.
    pub(crate) a: Vec<u32>,
    /// The right operand's buffer.
    pub(crate) b: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::default();
}

impl Scratch {
    /// This thread's buffers (empty ones when a product on this thread holds them).
    pub(crate) fn take() -> Scratch {
        SCRATCH.with(std::cell::Cell::take)
    }

    /// Gives the buffers back for the next product on this thread.
    pub(crate) fn put_back(self) {
        SCRATCH.with(|s| s.set(self));
    }

    /// This thread's left operand's buffer alone (a product packing its right operands in
    /// tasks, some on this thread, leaves them the other).
    pub(crate) fn take_left() -> Vec<u32> {
        let Scratch { a, b } = Self::take();
        Scratch { a: Vec::new(), b }.put_back();
        a
    }

    /// Gives back the buffer [`Scratch::take_left`] took.
    pub(crate) fn put_left(a: Vec<u32>) {
        let Scratch { b, .. } = Self::take();
        Scratch { a, b }.put_back();
    }

    /// This thread's right operand's buffer alone.
    pub(crate) fn take_right() -> Vec<u32> {
        let Scratch { a, b } = Self::take();
        Scratch { a, b: Vec::new() }.put_back();
        b
    }

    /// Gives back the buffer [`Scratch::take_right`] took.
    pub(crate) fn put_right(b: Vec<u32>) {
        let Scratch { a, .. } = Self::take();
        Scratch { a, b }.put_back();
    }
}

/// A raw pointer that may cross to the pool's threads: each task writes its own part (the
/// destination's columns in `gemm`, a pair's words in `pack`).
struct SendPtr<T>(*mut T);
// SAFETY: the tasks write disjoint parts of what it points to (see its uses).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// A matrix packed for the micro-kernel ([`pack`]'s layout): a left operand in panels of [`MR`]
/// rows, or a right one, seen transposed, in panels of [`NR`] columns; `pairs` pair words of
/// `k` each. Ops that reuse an operand (attention's keys and values, for every chunk of
/// queries) pack it once.
pub(crate) struct Panels {
    words: Vec<u32>,
    /// Pairs of `k` (`k` rounded up to even, halved).
    pairs: usize,
    /// Rows of the left operand, or columns of the right one.
    len: usize,
    /// Rows ([`MR`]) or columns ([`NR`]) per panel.
    w: usize,
}

impl Panels {
    /// `a [m, k]` as a left operand, into `buf` (a buffer of an earlier product, or empty).
    pub(crate) fn left(a: &Mat<'_, f32>, buf: Vec<u32>) -> Panels {
        let (words, pairs) = pack(a, MR, buf);
        Panels {
            words,
            pairs,
            len: a.shape().0,
            w: MR,
        }
    }

    /// `b [k, n]` as a right operand, into `buf`.
    pub(crate) fn right(b: &Mat<'_, f32>, buf: Vec<u32>) -> Panels {
        let (words, pairs) = pack(&b.t(), NR, buf);
        Panels {
            words,
            pairs,
            len: b.shape().1,
            w: NR,
        }
    }

    /// An operand whose pair words someone wrote in [`pack`]'s layout: `len` rows of a left
    /// operand (`w` = [`MR`]) or columns of a right one (`w` = [`NR`]), `pairs` pairs of `k`.
    pub(crate) fn from_words(words: Vec<u32>, (len, pairs): (usize, usize), w: usize) -> Panels {
        assert!((w == MR || w == NR) && words.len() >= len.div_ceil(w) * pairs * w);
        Panels {
            words,
            pairs,
            len,
            w,
        }
    }

    /// A right operand `b [k, n]` whose pair words come from `pairs`: `pairs(q, j0, words)`
    /// writes those of rows `2q` and `2q + 1` (zero past row `k`) at columns `j0..j0 + NR`
    /// (zero past column `n`), as [`pair_run`] makes them. For an operand no one holds whole (a
    /// conv's im2col matrix, read a panel at a time from the image): packing it costs no pass
    /// over memory of its own. On the calling thread, into `buf`.
    fn right_from(
        (k, n): (usize, usize),
        mut buf: Vec<u32>,
        pairs: impl Fn(usize, usize, &mut [u32; NR]),
    ) -> Panels {
        let cp = k.div_ceil(2);
        panel_buffer(&mut buf, n, cp, NR);
        for (p, panel) in buf.chunks_mut(cp * NR).enumerate() {
            let (words, _) = panel.as_chunks_mut::<NR>();
            for (q, words) in words.iter_mut().enumerate() {
                pairs(q, p * NR, words);
            }
        }
        Panels {
            words: buf,
            pairs: cp,
            len: n,
            w: NR,
        }
    }

    /// Bytes of the packed words.
    pub(crate) fn bytes(&self) -> usize {
        self.words.len() * 4
    }

    /// The buffer, for the next product.
    pub(crate) fn into_buffer(self) -> Vec<u32> {
        self.words
    }

    /// Column panels of a right operand.
    pub(crate) fn col_panels(&self) -> usize {
        self.len.div_ceil(NR)
    }

    /// The whole operand as a [`Block`].
    pub(crate) fn all(&self) -> Block<'_> {
        Block {
            of: self,
            panels: (0, self.len.div_ceil(self.w)),
            pairs: (0, self.pairs),
        }
    }
}

/// Part of a packed operand for [`multiply`]: its panels `panels.0..panels.1` (rows of a left
/// operand in panels of [`MR`], columns of a right one in panels of [`NR`]) over its pairs
/// `pairs.0..pairs.1` of `k`. Attention's blocks of queries and keys are blocks of operands
/// packed once per head.
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    of: &'a Panels,
    panels: (usize, usize),
    pairs: (usize, usize),
}

impl Block<'_> {
    /// The panels holding rows (or columns) `r0..r1` of the operand; `r0` must start a panel.
    pub(crate) fn lines(self, (r0, r1): (usize, usize)) -> Self {
        let w = self.of.w;
        assert!(
            r0.is_multiple_of(w) && r1 <= self.of.len,
            "lines {r0}..{r1} of panels of {w}"
        );
        Block {
            panels: (r0 / w, r1.div_ceil(w)),
            ..self
        }
    }

    /// The pairs holding `k` numbers `k0..k1` of the operand; `k0` must be even.
    pub(crate) fn depth(self, (k0, k1): (usize, usize)) -> Self {
        assert!(k0.is_multiple_of(2) && k1.div_ceil(2) <= self.of.pairs);
        Block {
            pairs: (k0 / 2, k1.div_ceil(2)),
            ..self
        }
    }

    /// Rows (or columns) of the block.
    fn extent(&self) -> usize {
        (self.panels.1 * self.of.w).min(self.of.len) - self.panels.0 * self.of.w
    }

    /// The words of panel `p` (of the operand) for the block's pairs `q0..q1` (counted from the
    /// block's first).
    fn panel(&self, p: usize, (q0, q1): (usize, usize)) -> &[u32] {
        let (w, start) = (self.of.w, p * self.of.pairs + self.pairs.0);
        &self.of.words[(start + q0) * w..(start + q1) * w]
    }
}

/// `dst [m, n] (+)= scale a @ b` for a block `a` of a packed left operand (`m` rows) and a block
/// `b` of a packed right one (`n` columns) of as many pairs of `k`, on the calling thread; `dst`
/// points at the block's first row and column. GotoBLAS's order: a block of `a`'s rows as deep
/// as a block of `k` ([`blocking`]; in L2) meets each panel of `b` over that depth in turn.
///
/// # Safety
/// `supported()` must hold; `dst` as in [`gemm`] for the block's `m x n` (`rs` 0: `n`).
pub(crate) unsafe fn multiply(
    dst: Dst<f32>,
    a: Block<'_>,
    b: Block<'_>,
    scale: f32,
    accumulate: bool,
) {
    let blocks = blocking(a.pairs.1 - a.pairs.0, a.panels.1 - a.panels.0);
    // SAFETY: the caller's promise.
    unsafe { multiply_in(blocks, dst, (a, b), (scale, accumulate)) }
}

/// [`multiply`] in blocks of `(qc, mp)`: `qc` pairs of `k`, `mp` panels of `a`'s rows.
///
/// # Safety
/// As [`multiply`].
unsafe fn multiply_in(
    (qc, mp): (usize, usize),
    dst: Dst<f32>,
    (a, b): (Block<'_>, Block<'_>),
    (scale, accumulate): (f32, bool),
) {
    let kp = a.pairs.1 - a.pairs.0;
    assert!(a.of.w == MR && b.of.w == NR && kp == b.pairs.1 - b.pairs.0);
    assert!(qc > 0 && mp > 0, "blocks of {qc} pairs, {mp} panels");
    let (m, n) = (a.extent(), b.extent());
    let rs = if dst.rs == 0 { n } else { dst.rs };
    let ((a0, a1), (b0, b1)) = (a.panels, b.panels);
    let mut q0 = 0;
    while q0 < kp {
        let q1 = (q0 + qc).min(kp);
        let add = accumulate || q0 > 0;
        for i0 in (a0..a1).step_by(mp) {
            for p in b0..b1 {
                let bpanel = b.panel(p, (q0, q1));
                let (c0, cols) = ((p - b0) * NR, NR.min(n - (p - b0) * NR));
                for i in i0..(i0 + mp).min(a1) {
                    let apanel = a.panel(i, (q0, q1));
                    let (r0, rows) = ((i - a0) * MR, MR.min(m - (i - a0) * MR));
                    // SAFETY: the caller checked the instructions; the panels hold `q1 - q0`
                    // pairs; the block lies within `dst` (rows < m, columns < n).
                    unsafe {
                        let out = Out {
                            c: dst.ptr.add(r0 * rs + c0),
                            rs,
                            block: (rows, cols),
                            scale,
                            accumulate: add,
                        };
                        if cols > NR / 2 {
                            kernel::<2>(apanel, bpanel, q1 - q0, out)
                        } else if cols > NR / 4 {
                            kernel::<1>(apanel, bpanel, q1 - q0, out)
                        } else {
                            // a narrow last panel (attention's 40-wide heads: 32 + 8)
                            kernel8(apanel, bpanel, q1 - q0, out)
                        }
                    }
                }
            }
        }
        q0 = q1;
    }
}

/// How [`multiply`] blocks a product of `pairs` pairs of `k` against `panels` panels of `a`:
/// `(pairs, panels)` per block, each even: the depth in blocks of at most [`KC`], `a`'s panels
/// in as few blocks as [`A_BLOCK_BYTES`] holds at that depth (one where they fit).
fn blocking(pairs: usize, panels: usize) -> (usize, usize) {
    let even = |len: usize, most: usize| len.div_ceil(len.div_ceil(most.max(1)).max(1)).max(1);
    let depth = even(pairs, KC / 2);
    (depth, even(panels, A_BLOCK_BYTES / (depth * MR * 4)))
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
    if m == 0 || n == 0 {
        return true;
    }
    let scratch = Scratch::take();
    let (pa, pb) = (Panels::left(&a, scratch.a), Panels::right(&b, scratch.b));
    // SAFETY: checked above; `dst` is the caller's promise.
    unsafe { gemm_packed(threads, dst, &pa, &pb, scale, accumulate) };
    Scratch {
        a: pa.into_buffer(),
        b: pb.into_buffer(),
    }
    .put_back();
    true
}

/// `dst [m, n] (+)= a @ b` on every thread where one operand was packed earlier (a frozen
/// weight's kept panels: see [`crate::weight_cache`]): `packed` is `a` (panels of [`MR`] rows)
/// and `other` is `b`, or `packed` is `b` (panels of [`NR`] columns) and `other` is `a`;
/// `other` is packed here. Returns `false` (and does nothing) where the CPU lacks AVX512-BF16.
///
/// # Safety
/// As [`gemm`]; `packed` holds `other`'s `k` in pairs.
pub(crate) unsafe fn gemm_with_packed(
    dst: Dst<f32>,
    packed: &Panels,
    other: Mat<'_, f32>,
    accumulate: bool,
) -> bool {
    if !supported() {
        return false;
    }
    let threads = rayon::current_num_threads();
    let packed_left = packed.w == MR;
    let k = if packed_left {
        other.shape().0
    } else {
        other.shape().1
    };
    assert_eq!(packed.pairs, k.div_ceil(2), "an operand of k = {k}");
    if packed.len == 0 || other.shape().0 == 0 || other.shape().1 == 0 {
        return true;
    }
    // SAFETY (both): checked above; `dst` is the caller's promise.
    if packed_left {
        let b = Panels::right(&other, Scratch::take_right());
        unsafe { gemm_packed(threads, dst, packed, &b, 1.0, accumulate) };
        Scratch::put_right(b.into_buffer());
    } else {
        let a = Panels::left(&other, Scratch::take_left());
        unsafe { gemm_packed(threads, dst, &a, packed, 1.0, accumulate) };
        Scratch::put_left(a.into_buffer());
    }
    true
}

/// Bytes of a right operand's panels that a task of [`gemm_right_from`] packs, then multiplies
/// while they are in L2 (1 MB a core on Zen 4 and Zen 5, beside a block of `a` of
/// [`A_BLOCK_BYTES`]); 384 KB ran SD 1.5's CFG step ~3% faster than 256 and 512 on Zen 5.
pub(crate) const CHUNK_BYTES: usize = 384 << 10;

/// The most bytes of a packed left operand that [`gemm_right_from`] reads again for each chunk
/// (a share of L3); past it, each task takes one chunk (SD 1.5's 1280-channel convs at 16x16
/// ran 10% slower in chunks, reading their 29 MB weight from memory again for each).
const A_IN_L3: usize = 8 << 20;

/// `dst [m, n] (+)= scale a @ b` for a right operand `b [k, n]` that no one holds whole, its
/// pair words from `pairs` (as in [`Panels::right_from`]): tasks take chunks of its column
/// panels, at most `chunk_bytes` of them packed (but one panel), and each multiplies its chunk
/// as soon as it has packed it. The packed operand never goes out to memory, and no task waits
/// for the others' packing.
///
/// # Safety
/// `supported()` must hold; `dst` as in [`gemm_packed`].
pub(crate) unsafe fn gemm_right_from(
    dst: Dst<f32>,
    a: &Panels,
    (k, n): (usize, usize),
    pairs: impl Fn(usize, usize, &mut [u32; NR]) + Sync,
    (scale, accumulate): (f32, bool),
    chunk_bytes: usize,
) {
    use rayon::prelude::*;
    let panel_bytes = k.div_ceil(2) * NR * 4;
    let col_panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads();
    if by_rows(a, col_panels, threads) {
        // few panels against a weight past L3: pack them all, then split the weight's rows
        let b = Panels::right_from((k, n), Scratch::take_right(), pairs);
        // SAFETY: the caller's promise.
        unsafe { gemm_packed(threads, dst, a, &b, scale, accumulate) };
        Scratch::put_right(b.into_buffer());
        return;
    }
    // each chunk reads all of `a` again: from L3 while it fits, else a chunk per task
    let per_chunk = if a.words.len() * 4 <= A_IN_L3 {
        (chunk_bytes / panel_bytes).clamp(1, col_panels.max(1))
    } else {
        col_panels.div_ceil(threads).max(1)
    };
    let rs = if dst.rs == 0 { n } else { dst.rs };
    let out = SendPtr(dst.ptr);
    let chunk = |c: usize| {
        let (j0, j1) = (c * per_chunk * NR, ((c + 1) * per_chunk * NR).min(n));
        let buf = Scratch::take_right();
        let cols = Panels::right_from((k, j1 - j0), buf, |q, j, words| pairs(q, j0 + j, words));
        // SAFETY: the caller's promise; each chunk writes its own columns `j0..j1`.
        unsafe {
            let dst = Dst {
                ptr: out.get().add(j0),
                rs,
            };
            multiply(dst, a.all(), cols.all(), scale, accumulate);
        }
        Scratch::put_right(cols.into_buffer());
    };
    (0..col_panels.div_ceil(per_chunk))
        .into_par_iter()
        .for_each(chunk);
}

/// Whether a product of a packed left operand `a` with `col_panels` column panels runs in
/// tasks over `a`'s rows rather than over the panels: where `a` is past [`A_IN_L3`] and there
/// are too few panels for a task to repay reading all of `a` from memory (a conv's weight at
/// SD's 8x8 and 16x16 latents: 29-59 MB against 2-8 panels of pixels, each task streaming all
/// of it).
fn by_rows(a: &Panels, col_panels: usize, threads: usize) -> bool {
    threads > 1 && a.words.len() * 4 > A_IN_L3 && col_panels < 4 * threads
}

/// `dst [m, n] (+)= scale a @ b` for packed operands, `threads` tasks over `b`'s column panels
/// (or over `a`'s rows: [`by_rows`]).
///
/// # Safety
/// `supported()` must hold; `dst` valid for `m` rows of `n` writes, `rs` apart (0: `n`), that
/// no other thread reads or writes meanwhile.
pub(crate) unsafe fn gemm_packed(
    threads: usize,
    dst: Dst<f32>,
    a: &Panels,
    b: &Panels,
    scale: f32,
    accumulate: bool,
) {
    let col_panels = b.col_panels();
    let rs = if dst.rs == 0 { b.len } else { dst.rs };
    let out = SendPtr(dst.ptr);
    if by_rows(a, col_panels, threads) {
        let per = a.len.div_ceil(MR).div_ceil(threads) * MR;
        rayon::scope(|s| {
            for r0 in (0..a.len).step_by(per) {
                let rows = a.all().lines((r0, (r0 + per).min(a.len)));
                // SAFETY: the caller's promise; each task writes its own rows.
                s.spawn(move |_| unsafe {
                    let dst = Dst {
                        ptr: out.get().add(r0 * rs),
                        rs,
                    };
                    multiply(dst, rows, b.all(), scale, accumulate)
                });
            }
        });
        return;
    }
    let run = |p0: usize, p1: usize| {
        let cols = b.all().lines((p0 * NR, (p1 * NR).min(b.len)));
        // SAFETY: the caller's promise; each task writes the columns of its own panels.
        unsafe {
            let dst = Dst {
                ptr: out.get().add(p0 * NR),
                rs,
            };
            multiply(dst, a.all(), cols, scale, accumulate)
        }
    };
    let tasks = threads.clamp(1, col_panels.max(1));
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
}

/// Where a micro-kernel writes: `c (+)= scale * sum a b` for the first `rows x cols` of its
/// block, rows `rs` apart (added to what is there when `accumulate`).
#[derive(Clone, Copy)]
struct Out {
    c: *mut f32,
    rs: usize,
    /// `(rows, cols)`.
    block: (usize, usize),
    scale: f32,
    accumulate: bool,
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
unsafe fn kernel<const V: usize>(a: &[u32], b: &[u32], pairs: usize, out: Out) {
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
unsafe fn kernel8(a: &[u32], b: &[u32], pairs: usize, out: Out) {
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
unsafe fn kernel8(_: &[u32], _: &[u32], _: usize, _: Out) {
    unreachable!("supported() is false off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const V: usize>(_: &[u32], _: &[u32], _: usize, _: Out) {
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

    /// The probabilities' panels hold `e^(s_t[k][q] - shift[q])` at query `q`'s row and key
    /// pair `k / 2`, zeros past the keys and queries, and the sums gain each query's
    /// exponentials: for strips of 48 queries whole, ragged and shorter than a vector.
    #[test]
    fn probabilities_pack_where_the_panels_want_them() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (keys, queries) in [(7, 1), (33, 13), (8, 48), (5, 50), (12, 96), (9, 100)] {
            let s_t: Vec<f32> = wave(keys * queries, 0.31).iter().map(|x| x - 2.0).collect();
            let shift = wave(queries, 0.7);
            let mut sums = vec![0.5f32; queries];
            let cp = keys.div_ceil(2);
            let garbage = vec![u32::MAX; queries.div_ceil(MR) * cp * MR + 7];
            let p = pack_exp_cols(&s_t, (keys, queries), &shift, &mut sums, garbage);
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
                    let w = p.words[((q / MR) * cp + t) * MR + q % MR];
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

    /// A left operand past L3's share against two column panels splits by rows, and gives
    /// the bits one task gives (each number's sums run in the same order either way).
    #[test]
    fn blocks_split_the_depth_evenly_and_hold_what_fits() {
        // SD's depths up to 1,280 run whole, with all 256 tokens (22 panels) of a 16x16 level
        assert_eq!(blocking(640, 22), (640, 22));
        assert_eq!(blocking(160, 22), (160, 22));
        // 1,024 tokens of a 32x32 level at depth 640 (86 panels): two blocks
        assert_eq!(blocking(320, 86), (320, 43));
        // 1,024 tokens at depth 1,280: 86 panels, 22 fit, in four blocks of 22 (the last 20)
        assert_eq!(blocking(640, 86), (640, 22));
        // deeper products in equal blocks no deeper than KC: a conv's 2,880 (320 x 9) in three
        // of 960, where its 320 rows (27 panels) fit in one
        assert_eq!(blocking(1440, 27), (480, 27));
        assert_eq!(blocking(1441, 1), (481, 1));
        assert_eq!(blocking(0, 0), (1, 1));
    }

    /// Blocks of a few pairs and panels (partial last ones) sum as one block does, within f32's
    /// rounding of the blocks' partial sums, into a result with rows `rs` apart.
    #[test]
    fn blocked_products_equal_f64_of_the_rounded_operands() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, n, k, rs) = (50, 70, 101, 75);
        let (av, bv) = (wave(m * k, 0.37), wave(k * n, 0.11));
        let (a, b) = (Mat::new(&av[..], m, k), Mat::new(&bv[..], k, n));
        let (pa, pb) = (Panels::left(&a, Vec::new()), Panels::right(&b, Vec::new()));
        let prior = wave(m * rs, 0.05);
        for (blocks, accumulate) in [
            ((51, 5), true),
            ((13, 2), false),
            ((7, 1), true),
            ((1, 3), false),
        ] {
            let mut c = prior.clone();
            let dst = Dst {
                ptr: c.as_mut_ptr(),
                rs,
            };
            // SAFETY: checked above; `c` holds m rows of rs >= n.
            unsafe { multiply_in(blocks, dst, (pa.all(), pb.all()), (0.5, accumulate)) };
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut size) = (0f64, 0f64);
                    for l in 0..k {
                        let x = round(a.at(i, l)) as f64 * round(b.at(l, j)) as f64;
                        want += x;
                        size += x.abs();
                    }
                    let before = if accumulate { prior[i * rs + j] } else { 0.0 };
                    let want = before as f64 + 0.5 * want;
                    let got = c[i * rs + j] as f64;
                    let tol = 1e-6 * (size + before.abs() as f64);
                    assert!(
                        (got - want).abs() <= tol,
                        "{blocks:?} ({i}, {j}): {got} vs {want}"
                    );
                }
                assert_eq!(c[i * rs + n..(i + 1) * rs], prior[i * rs + n..(i + 1) * rs]);
            }
        }
    }

    #[test]
    fn splitting_by_rows_gives_the_bits_of_one_task() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, k, n) = (1285, 3302, 40);
        let (a, b) = (wave(m * k, 0.013), wave(k * n, 0.7));
        let pa = Panels::left(&Mat::new(&a, m, k), Vec::new());
        let pb = Panels::right(&Mat::new(&b, k, n), Vec::new());
        assert!(by_rows(&pa, pb.col_panels(), 2) && !by_rows(&pa, pb.col_panels(), 1));
        let run = |threads| {
            let mut c = vec![1f32; m * n];
            let dst = Dst {
                ptr: c.as_mut_ptr(),
                rs: 0,
            };
            // SAFETY: checked above; `c` is `m x n`.
            unsafe { gemm_packed(threads, dst, &pa, &pb, 0.5, true) };
            c
        };
        let (one, split) = (run(1), run(2));
        assert!(one
            .iter()
            .zip(&split)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        // and the product is there: a row's first number against an f64 sum
        let want: f64 = 1.0
            + 0.5
                * (0..k)
                    .map(|i| round(a[(m - 1) * k + i]) as f64 * round(b[i * n]) as f64)
                    .sum::<f64>();
        let got = split[(m - 1) * n] as f64;
        assert!(
            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{got} vs {want}"
        );
    }

    /// A reused packing buffer full of NaN pairs packs as a fresh one does: every word is
    /// written or zeroed (the panels' padding included), for each orientation and edge.
    #[test]
    fn packing_into_a_used_buffer_leaves_nothing_of_it() {
        for &(rows, cols, w) in &[(13, 7, MR), (12, 8, MR), (33, 5, NR), (70, 601, NR)] {
            let v = wave(rows * cols, 0.3);
            for m in [Mat::new(&v, rows, cols), Mat::new(&v, cols, rows).t()] {
                let (fresh, cp) = pack(&m, w, Vec::new());
                assert_eq!(fresh.len(), rows.div_ceil(w) * cp * w);
                for used in [
                    vec![u32::MAX; fresh.len()],
                    vec![u32::MAX; 2 * fresh.len() + 5],
                ] {
                    assert_eq!(pack(&m, w, used).0, fresh, "{rows}x{cols} in panels of {w}");
                }
            }
        }
    }

    /// The tile's transposition in AVX-512 writes what the scalar loop writes, and nothing
    /// past the rows and pairs it is given.
    #[test]
    fn tiles_transpose_out_as_the_scalar_loop_does() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut tile = [[0u32; 16]; 32];
        for (i, v) in tile.iter_mut().flatten().enumerate() {
            *v = (i as u32).wrapping_mul(2_654_435_761);
        }
        for w in [MR, NR] {
            for rows in 1..=w {
                for pairs in [1, 3, 15, 16] {
                    let len = 16 * w + 7;
                    let (mut want, mut got) = (vec![7u32; len], vec![7u32; len]);
                    tile_out(&tile, (rows, pairs), &mut want, w, false);
                    tile_out(&tile, (rows, pairs), &mut got, w, true);
                    assert_eq!(got, want, "{rows} rows, {pairs} pairs, panels of {w}");
                }
            }
        }
    }

    /// bf16 numbers pack into the words their f32 values round to, along rows and columns.
    #[test]
    fn bf16_numbers_pack_as_their_f32_values() {
        for &(rows, cols, w) in &[(13, 7, MR), (33, 5, NR), (70, 601, NR), (300, 64, MR)] {
            let h: Vec<half::bf16> = wave(rows * cols, 0.3)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect();
            let v: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
            for t in [false, true] {
                let view = |d| match t {
                    false => Mat::new(d, rows, cols),
                    true => Mat::new(d, cols, rows).t(),
                };
                let want = pack(&view(Data::Plain(&v)), w, Vec::new());
                let got = pack(&view(Data::Bf16(&h)), w, Vec::new());
                assert_eq!(got, want, "{rows}x{cols} transposed {t}");
            }
        }
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
            let orders = [(false, false), (true, false), (false, true), (true, true)];
            // either operand may hold bf16 numbers (a weight kept in bf16): packed as they are
            for ((a_t, b_t), bf16_operand) in orders.into_iter().zip([None, Some(0), Some(1), None])
            {
                let (av, bv) = (wave(m * k, 0.37), wave(k * n, 0.11));
                let round = |v: &[f32]| -> Vec<half::bf16> {
                    v.iter()
                        .map(|&x| half::bf16::from_bits(to_bf16(x)))
                        .collect()
                };
                let (ah, bh) = (round(&av), round(&bv));
                let data = |which, v, h| -> Data<'_, f32> {
                    if bf16_operand == Some(which) {
                        Data::Bf16(h)
                    } else {
                        Data::Plain(v)
                    }
                };
                let (ad, bd) = (data(0, &av, &ah), data(1, &bv, &bh));
                let a = if a_t {
                    Mat::new(ad, k, m).t()
                } else {
                    Mat::new(ad, m, k)
                };
                let b = if b_t {
                    Mat::new(bd, n, k).t()
                } else {
                    Mat::new(bd, k, n)
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
                                "{m}x{n}x{k} a_t {a_t} b_t {b_t} bf16 {bf16_operand:?}: \
                                 [{i},{j}] {got} vs {want}"
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

/// The micro-kernel's rate on one core with its panels in L1, the ceiling the products work
/// against: `cargo test --release -p atomtune-ops --lib kernel_peak -- --ignored --nocapture`;
/// and, on a thread a core at SD 1.5's shapes, the products on packed operands in place and
/// the packing alone: `... --lib in_place -- --ignored --nocapture --test-threads 1`.
#[cfg(test)]
mod peak {
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn kernel_peak() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let pairs = 256;
        // bf16 1.0 in both halves of every pair word
        let (a, b) = (
            vec![0x3f80_3f80u32; pairs * MR],
            vec![0x3f80_3f80u32; pairs * NR],
        );
        let mut c = vec![0f32; MR * NR];
        let reps = 200_000;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            // SAFETY: checked above; the panels hold `pairs` pairs, `c` one block.
            let out = Out {
                c: c.as_mut_ptr(),
                rs: NR,
                block: (MR, NR),
                scale: 1.0,
                accumulate: true,
            };
            unsafe { kernel::<2>(&a, &b, pairs, out) };
        }
        let dt = t.elapsed().as_secs_f64();
        let flops = 2.0 * (MR * NR * 2 * pairs) as f64 * reps as f64;
        assert_eq!(c[0], (2 * pairs * reps) as f32);
        eprintln!(
            "micro-kernel, one core, panels in L1: {:.1} GFLOP/s",
            flops / dt / 1e9
        );
    }

    /// The best of 15 runs of `f`, seconds (on rayon's pool: a thread a core).
    fn best_of_15(mut f: impl FnMut()) -> f64 {
        (0..15)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn in_place_product_rate() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // (m, k, n): a 64x64 conv's forward, a 64x64 attention projection, its GEGLU's output
        for (m, k, n) in [(320, 2880, 4096), (8192, 320, 320), (8192, 1280, 320)] {
            let (a, b) = (vec![0.25f32; m * k], vec![0.5f32; k * n]);
            let pa = Panels::left(&Mat::new(&a[..], m, k), Vec::new());
            let pb = Panels::right(&Mat::new(&b[..], k, n), Vec::new());
            let mut c = vec![0f32; m * n];
            let dst = Dst {
                ptr: c.as_mut_ptr(),
                rs: 0,
            };
            // SAFETY: checked above; `c` holds the m x n product.
            let dt = best_of_15(|| unsafe { gemm_packed(2, dst, &pa, &pb, 1.0, false) });
            assert_eq!(c[0], 0.125 * k as f32);
            let rate = 2.0 * (m * n * k) as f64 / dt / 1e9;
            eprintln!("{m}x{k}x{n} on packed operands: {rate:.0} GFLOP/s");
        }
    }

    /// A frozen weight's product as the linear layers run it ([`gemm_with_packed`]: the
    /// activations packed per call, the weight's panels kept), at SDXL's linear shapes, the
    /// weight cycling through copies that together pass L3 (a UNet reads each weight from
    /// memory once a step).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn streamed_weight_rate() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // (m, k, n): 16x16 tokens' projections, GEGLU in and out; 32x32's
        for (m, k, n) in [
            (256, 1280, 1280),
            (256, 1280, 10240),
            (256, 5120, 1280),
            (1024, 640, 640),
            (1024, 640, 5120),
            (1024, 2560, 640),
        ] {
            let (x, w) = (vec![0.25f32; m * k], vec![0.5f32; k * n]);
            let pw = Panels::right(&Mat::new(&w[..], k, n), Vec::new());
            let copies = (128usize << 20).div_ceil(pw.bytes()).max(2);
            let ws: Vec<Panels> = (0..copies)
                .map(|_| Panels::from_words(pw.words.clone(), (n, pw.pairs), NR))
                .collect();
            let mut c = vec![0f32; m * n];
            let dst = Dst {
                ptr: c.as_mut_ptr(),
                rs: 0,
            };
            // SAFETY: checked above; `c` holds the m x n product.
            let dt = best_of_15(|| unsafe {
                for w in &ws {
                    gemm_with_packed(dst, w, Mat::new(&x[..], m, k), false);
                }
            }) / copies as f64;
            assert_eq!(c[0], 0.125 * k as f32);
            let rate = 2.0 * (m * n * k) as f64 / dt / 1e9;
            eprintln!(
                "{m}x{k}x{n}, weight from memory: {rate:.0} GFLOP/s ({:.3} ms)",
                dt * 1e3
            );
        }
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn in_place_packing_rate() {
        // (k, n) of a right operand `[k, n]` (rows side by side), and the same read transposed
        // as a left operand (rows as runs)
        for (k, n) in [(320, 8192), (2880, 4096), (1280, 1024)] {
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let (mut right, mut left) = (Vec::new(), Vec::new());
            let r = best_of_15(|| {
                let p = Panels::right(&Mat::new(&b[..], k, n), std::mem::take(&mut right));
                right = p.into_buffer();
            });
            let l = best_of_15(|| {
                let p = Panels::left(&Mat::new(&b[..], k, n).t(), std::mem::take(&mut left));
                left = p.into_buffer();
            });
            eprintln!(
                "packing {k}x{n}: right {:.3} ms, left of its transpose {:.3} ms",
                r * 1e3,
                l * 1e3
            );
        }
    }
}
