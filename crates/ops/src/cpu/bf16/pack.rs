//! Operands packed for the micro-kernel: f32 or bf16 matrices, read in place or transposed,
//! into panels of pair words ([`Panels`]), and the buffers they reuse ([`Scratch`]).

use super::round::{pair, pair_run, pairs16};
use super::{amx, supported, SendPtr, GROUP, MR, NR};
#[cfg(target_arch = "x86_64")]
use super::{first_lanes, pair16};
use crate::cpu::matmul::{Data, Mat};

/// What [`pack`] reads: f32 numbers, rounded to bf16 as they are packed, or bf16 numbers (a
/// weight kept in bf16), packed as they are.
trait Packed: Copy + Send + Sync {
    const ZERO: Self;

    /// `lo` and `hi` as one pair word.
    fn pair(lo: Self, hi: Self) -> u32;

    /// 32 consecutive numbers as 16 pair words (`simd`: the CPU has the bf16 products:
    /// [`supported`]).
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
        Data::Plain(d) => pack_from(d, m, (w, false), out),
        Data::Bf16(d) => pack_from(d, m, (w, false), out),
    }
}

/// `m` (whose rows are runs in memory: its row stride is not 1) packed as a left operand
/// straight into [`Panels::tiled`]'s layout: each panel's rows of a group of pairs copied as
/// they are made, where [`pack`] transposes them.
fn pack_tiled(m: &Mat<'_, f32>, out: Vec<u32>) -> (Vec<u32>, usize) {
    match m.data {
        Data::Plain(d) => pack_from(d, m, (MR, true), out),
        Data::Bf16(d) => pack_from(d, m, (MR, true), out),
    }
}

/// [`pack`] (or [`pack_tiled`], when `tiled`) of `m`, whose numbers are `d`.
fn pack_from<S: Packed>(
    d: &[S],
    m: &Mat<'_, f32>,
    (w, tiled): (usize, bool),
    mut out: Vec<u32>,
) -> (Vec<u32>, usize) {
    debug_assert!(w <= 32);
    use rayon::prelude::*;
    let (rows, cols) = m.shape();
    let (cs, rs) = m.strides();
    let cp = cols.div_ceil(2);
    let stride = if tiled {
        tiled_buffer(&mut out, rows, cp.next_multiple_of(GROUP));
        cp.next_multiple_of(GROUP)
    } else {
        panel_buffer(&mut out, rows, cp, w);
        cp
    };
    let parallel = rows * cols >= 1 << 16;
    if rs == 1 {
        assert!(!tiled, "rows that are no runs are tiled after packing");
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
                if tiled {
                    // a group's rows one after the other, zero past the pairs
                    let group = &mut panel[q0 * w..(q0 + T) * w];
                    for (row, words) in group.chunks_exact_mut(T).zip(&tile).take(r_end) {
                        row[..tq].copy_from_slice(&words[..tq]);
                        row[tq..].fill(0);
                    }
                } else {
                    tile_out(&tile, (r_end, tq), &mut panel[q0 * w..], w, simd);
                }
            }
        }
    };
    if parallel {
        out.par_chunks_mut(stride * w)
            .enumerate()
            .for_each(pack_panel);
    } else if !out.is_empty() {
        out.chunks_mut(stride * w).enumerate().for_each(pack_panel);
    }
    (out, cp)
}

/// Sizes `out` (a buffer of an earlier product: see `Scratch`) for `rows` rows of `cp` pairs in
/// panels of `w` rows, and zeroes the last panel's rows past the matrix: the packers write every
/// other word.
pub(super) fn panel_buffer(out: &mut Vec<u32>, rows: usize, cp: usize, w: usize) {
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

/// [`panel_buffer`] for [`Panels::tiled`]'s layout, `stride` pairs a panel (whole groups): the
/// last panel's rows past the matrix zeroed in every group.
fn tiled_buffer(out: &mut Vec<u32>, rows: usize, stride: usize) {
    let len = rows.div_ceil(MR) * stride * MR;
    if out.len() < len {
        out.resize(len, 0);
    }
    out.truncate(len);
    if !rows.is_multiple_of(MR) {
        let last = &mut out[(rows / MR) * stride * MR..];
        for group in last.chunks_exact_mut(GROUP * MR) {
            group[(rows % MR) * GROUP..].fill(0);
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

/// A matrix packed for the micro-kernel ([`pack`]'s layout): a left operand in panels of [`MR`]
/// rows, or a right one, seen transposed, in panels of [`NR`] columns; `pairs` pair words of
/// `k` each. Ops that reuse an operand (attention's keys and values, for every chunk of
/// queries) pack it once.
///
/// A left operand for the AMX tiles is `tiled` ([`Panels::tiled`]): each panel in groups of
/// [`GROUP`] pairs, a group's rows one after the other (`[pairs / GROUP][MR][GROUP]`, zero past
/// `pairs`), as `tileloadd` reads a tile of `MR` rows.
pub(crate) struct Panels {
    pub(super) words: Vec<u32>,
    /// Pairs of `k` (`k` rounded up to even, halved).
    pub(super) pairs: usize,
    /// Rows of the left operand, or columns of the right one.
    pub(super) len: usize,
    /// Rows ([`MR`]) or columns ([`NR`]) per panel.
    pub(super) w: usize,
    /// Whether the panels are in AMX tiles' groups (a left operand only).
    pub(super) tiled: bool,
}

impl Panels {
    /// `a [m, k]` as a left operand, into `buf` (a buffer of an earlier product, or empty).
    /// Tiled where the AMX tiles run the products ([`Panels::for_kernel`]): rows that are runs
    /// in memory straight into tiles, rows side by side packed, then regrouped.
    pub(crate) fn left(a: &Mat<'_, f32>, buf: Vec<u32>) -> Panels {
        if a.strides().1 != 1 && amx::active() {
            let (words, pairs) = pack_tiled(a, buf);
            return Panels {
                words,
                pairs,
                len: a.shape().0,
                w: MR,
                tiled: true,
            };
        }
        Panels::left_pairs(a, buf).for_kernel()
    }

    /// `a [m, k]` as a left operand in [`pack`]'s layout, never tiled: for operands whose rows
    /// lie side by side (tiles would pack, then regroup them) in products too small to repay
    /// that (attention's `P^T` against a head's width).
    pub(crate) fn left_pairs(a: &Mat<'_, f32>, buf: Vec<u32>) -> Panels {
        let (words, pairs) = pack(a, MR, buf);
        Panels {
            words,
            pairs,
            len: a.shape().0,
            w: MR,
            tiled: false,
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
            tiled: false,
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
            tiled: false,
        }
        .for_kernel()
    }

    /// A left operand as the products will read it: [`Panels::tiled`] where the AMX tiles
    /// run them ([`amx::active`]), else as it is.
    pub(super) fn for_kernel(self) -> Panels {
        if self.w == MR && !self.tiled && amx::active() {
            self.tiled()
        } else {
            self
        }
    }

    /// A left operand in the AMX tiles' groups of [`GROUP`] pairs (see [`Panels`]), the pairs
    /// past `pairs` zero.
    pub(super) fn tiled(self) -> Panels {
        use rayon::prelude::*;
        assert!(
            self.w == MR && !self.tiled,
            "only a left operand's panels are tiled"
        );
        let (cp, stride) = (self.pairs, self.pairs.next_multiple_of(GROUP));
        let mut words = vec![0u32; self.len.div_ceil(MR) * stride * MR];
        let regroup = |(p, out): (usize, &mut [u32])| {
            let panel = &self.words[p * cp * MR..(p + 1) * cp * MR];
            for (q, pair) in panel.chunks_exact(MR).enumerate() {
                let group = &mut out[(q / GROUP) * GROUP * MR..];
                for (r, &word) in pair.iter().enumerate() {
                    group[r * GROUP + q % GROUP] = word;
                }
            }
        };
        if words.len() >= 1 << 16 {
            words
                .par_chunks_mut(stride * MR)
                .enumerate()
                .for_each(regroup);
        } else if !words.is_empty() {
            words.chunks_mut(stride * MR).enumerate().for_each(regroup);
        }
        Panels {
            words,
            tiled: true,
            ..self
        }
    }

    /// Pairs each panel holds in `words`: `pairs`, rounded up to [`GROUP`] where tiled.
    pub(super) fn stride(&self) -> usize {
        if self.tiled {
            self.pairs.next_multiple_of(GROUP)
        } else {
            self.pairs
        }
    }

    /// The pair word of pair `q` at row (or column) `r` of panel `p`, in either layout.
    #[cfg(test)]
    pub(super) fn word(&self, p: usize, q: usize, r: usize) -> u32 {
        let panel = &self.words[p * self.stride() * self.w..];
        if self.tiled {
            panel[(q / GROUP) * GROUP * MR + r * GROUP + q % GROUP]
        } else {
            panel[q * self.w + r]
        }
    }

    /// A right operand `b [k, n]` whose pair words come from `pairs`: `pairs(q, j0, words)`
    /// writes those of rows `2q` and `2q + 1` (zero past row `k`) at columns `j0..j0 + NR`
    /// (zero past column `n`), as [`pair_run`] makes them. For an operand no one holds whole (a
    /// conv's im2col matrix, read a panel at a time from the image): packing it costs no pass
    /// over memory of its own. On the calling thread, into `buf`.
    pub(super) fn right_from(
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
            tiled: false,
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

/// Part of a packed operand for [`super::multiply`]: its panels `panels.0..panels.1` (rows of a
/// left operand in panels of [`MR`], columns of a right one in panels of [`NR`]) over its
/// pairs `pairs.0..pairs.1` of `k`. Attention's blocks of queries and keys are blocks of
/// operands packed once per head.
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    pub(super) of: &'a Panels,
    pub(super) panels: (usize, usize),
    pub(super) pairs: (usize, usize),
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

    /// The pairs holding `k` numbers `k0..k1` of the operand; `k0` must be even. Not for tiled
    /// panels (their groups are whole).
    pub(crate) fn depth(self, (k0, k1): (usize, usize)) -> Self {
        assert!(k0.is_multiple_of(2) && k1.div_ceil(2) <= self.of.pairs && !self.of.tiled);
        Block {
            pairs: (k0 / 2, k1.div_ceil(2)),
            ..self
        }
    }

    /// Rows (or columns) of the block.
    pub(super) fn extent(&self) -> usize {
        (self.panels.1 * self.of.w).min(self.of.len) - self.panels.0 * self.of.w
    }

    /// The words of panel `p` (of the operand) for the block's pairs `q0..q1` (counted from the
    /// block's first); tiled panels' in whole groups (`q0` must start one).
    pub(super) fn panel(&self, p: usize, (q0, q1): (usize, usize)) -> &[u32] {
        let (w, stride) = (self.of.w, self.of.stride());
        let (start, mut end) = (self.pairs.0 + q0, self.pairs.0 + q1);
        if self.of.tiled {
            assert!(start.is_multiple_of(GROUP), "pair {start} starts no group");
            end = end.next_multiple_of(GROUP).min(stride);
        }
        &self.of.words[(p * stride + start) * w..(p * stride + end) * w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::wave;

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

    /// Tiled panels hold each pair word where a tile's row reads it (`[group][row][pair]`),
    /// zeros past the pairs and rows, and a block of whole groups slices them: for depths
    /// within one group, at a group's end and past it, and edges in rows.
    #[test]
    fn tiled_panels_hold_the_words_of_plain_ones() {
        for &(rows, cols) in &[(1, 1), (13, 7), (12, 32), (25, 33), (30, 101)] {
            let v = wave(rows * cols, 0.3);
            let plain = Panels::left_pairs(&Mat::new(&v, rows, cols), Vec::new());
            let tiled = Panels::left_pairs(&Mat::new(&v, rows, cols), Vec::new()).tiled();
            let (cp, stride) = (plain.pairs, tiled.stride());
            assert_eq!(stride, cp.div_ceil(GROUP) * GROUP);
            assert_eq!(tiled.words.len(), rows.div_ceil(MR) * stride * MR);
            for p in 0..rows.div_ceil(MR) {
                let panel = &tiled.words[p * stride * MR..(p + 1) * stride * MR];
                for q in 0..stride {
                    for r in 0..MR {
                        let want = if q < cp { plain.word(p, q, r) } else { 0 };
                        let at = (q / GROUP) * GROUP * MR + r * GROUP + q % GROUP;
                        assert_eq!(panel[at], want, "{rows}x{cols}: panel {p} pair {q} row {r}");
                        assert_eq!(tiled.word(p, q, r), want);
                    }
                }
                // the whole depth, and its last group alone
                assert_eq!(tiled.all().panel(p, (0, cp)), panel);
                let last = (cp - 1) / GROUP * GROUP;
                assert_eq!(tiled.all().panel(p, (last, cp)), &panel[last * MR..]);
            }
            // packed as the products pack them, into used buffers: rows that are runs straight
            // into tiles, the transposed view regrouped; the same words either way
            let t: Vec<f32> = (0..rows * cols)
                .map(|i| v[(i % rows) * cols + i / rows])
                .collect();
            for m in [Mat::new(&v, rows, cols), Mat::new(&t, cols, rows).t()] {
                let used = vec![u32::MAX; 2 * tiled.words.len() + 3];
                let direct = crate::cpu::bf16::amx::forced(|| Panels::left(&m, used));
                assert!(direct.tiled);
                assert_eq!(direct.words, tiled.words, "{rows}x{cols} {:?}", m.strides());
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
}
