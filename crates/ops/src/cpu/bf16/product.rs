//! Products of packed operands: blocked for the caches, split among the pool's threads.

use super::kernel::{kernel, kernel8, Out};
use super::{amx, supported, Block, Panels, Scratch, SendPtr, GROUP, MR, NR};
use crate::cpu::matmul::{Dst, Mat};

/// The most `k` per block (even): depths up to SD's 1,280 run whole, so each block of the
/// result is written once; deeper products in equal blocks (a `KC x NR` panel of `b` is 80 KB
/// of bf16, in L2). At 512, SDXL's linears wrote their outputs three times, at 10-25% less rate.
const KC: usize = 1280;
/// Bytes of `a`'s rows a block holds (in L2, 1 MB a core on Zen 4 and Zen 5, beside `b`'s
/// panel or chunk): SD's 16x16 level's 256 tokens at depth 1,280 in one block, so each panel of
/// a streamed weight meets all of them once.
const A_BLOCK_BYTES: usize = 672 << 10;

/// `dst [m, n] (+)= scale a @ b` for a block `a` of a packed left operand (`m` rows) and a block
/// `b` of a packed right one (`n` columns) of as many pairs of `k`, on the calling thread; `dst`
/// points at the block's first row and column. GotoBLAS's order: a block of `a`'s rows as deep
/// as a block of `k` ([`blocking`]; in L2) meets each panel of `b` over that depth in turn. A
/// tiled `a` ([`Panels::tiled`]) runs on AMX tiles ([`amx::Tiles`]), its blocks of `k` in whole
/// groups; others on the AVX512-BF16 micro-kernels.
///
/// # Safety
/// `supported()` must hold; `dst` as in [`gemm()`] for the block's `m x n` (`rs` 0: `n`).
pub(crate) unsafe fn multiply(
    dst: Dst<f32>,
    a: Block<'_>,
    b: Block<'_>,
    scale: f32,
    accumulate: bool,
) {
    let (mut qc, mp) = blocking(a.pairs.1 - a.pairs.0, a.panels.1 - a.panels.0);
    if a.of.tiled {
        // a tiled operand's blocks of `k` start at its groups
        qc = qc.next_multiple_of(GROUP);
    }
    let blocks = (qc, mp);
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
    let mut tiles = a.of.tiled.then(|| {
        assert!(
            qc.is_multiple_of(GROUP),
            "blocks of {qc} pairs of a tiled operand"
        );
        amx::Tiles::new()
    });
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
                let out = |i: usize| {
                    let (r0, rows) = ((i - a0) * MR, MR.min(m - (i - a0) * MR));
                    Out {
                        // SAFETY: the block lies within `dst` (rows < m, columns < n)
                        c: unsafe { dst.ptr.add(r0 * rs + c0) },
                        rs,
                        block: (rows, cols),
                        scale,
                        accumulate: add,
                    }
                };
                if let Some(tiles) = tiles.as_mut() {
                    // SAFETY: each block's `out` lies within `dst` (the caller's promise).
                    let panels = (i0, (i0 + mp).min(a1));
                    unsafe { tiles.rows(&a, (panels, (q0, q1)), bpanel, out) };
                    continue;
                }
                for i in i0..(i0 + mp).min(a1) {
                    let (apanel, out) = (a.panel(i, (q0, q1)), out(i));
                    // SAFETY: the caller checked the instructions; the panels hold `q1 - q0`
                    // pairs; `out` lies within `dst`.
                    unsafe {
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
/// As [`crate::cpu::matmul::gemm`]: `dst` valid for `m` rows of `n` writes, `rs` apart (0: `n`).
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
/// As [`gemm()`]; `packed` holds `other`'s `k` in pairs.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::round::{from_bf16, round, to_bf16};
    use crate::cpu::bf16::wave;
    use crate::cpu::matmul::Data;

    /// The blocks of depth and of `a`'s panels at SD's shapes.
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
    /// rounding of the blocks' partial sums, into a result with rows `rs` apart; on the
    /// AVX512-BF16 kernel and on AMX tiles (the CPU's, else emulated), whose blocks of `k` are
    /// whole groups, and whose whole blocks at scale 1 add to the result in place.
    #[test]
    fn blocked_products_equal_f64_of_the_rounded_operands() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, n, k, rs) = (50, 70, 101, 75);
        let (av, bv) = (wave(m * k, 0.37), wave(k * n, 0.11));
        let (a, b) = (Mat::new(&av[..], m, k), Mat::new(&bv[..], k, n));
        let pa = Panels::left_pairs(&a, Vec::new());
        let (ta, pb) = (
            Panels::left_pairs(&a, Vec::new()).tiled(),
            Panels::right(&b, Vec::new()),
        );
        let prior = wave(m * rs, 0.05);
        let plain = [
            ((51, 5), true),
            ((13, 2), false),
            ((7, 1), true),
            ((1, 3), false),
        ];
        let tiled = [
            ((64, 5), true),
            ((16, 2), false),
            ((32, 1), true),
            ((16, 3), false),
        ];
        let cases = (plain.map(|c| (&pa, c, 0.5)).into_iter())
            .chain(tiled.map(|c| (&ta, c, 0.5)))
            .chain(tiled.map(|c| (&ta, c, 1.0)));
        for (pa, (blocks, accumulate), scale) in cases {
            let mut c = prior.clone();
            let dst = Dst {
                ptr: c.as_mut_ptr(),
                rs,
            };
            // SAFETY: checked above; `c` holds m rows of rs >= n.
            unsafe { multiply_in(blocks, dst, (pa.all(), pb.all()), (scale, accumulate)) };
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut size) = (0f64, 0f64);
                    for l in 0..k {
                        let x = round(a.at(i, l)) as f64 * round(b.at(l, j)) as f64;
                        want += x;
                        size += x.abs();
                    }
                    let before = if accumulate { prior[i * rs + j] } else { 0.0 };
                    let want = before as f64 + scale as f64 * want;
                    let got = c[i * rs + j] as f64;
                    let tol = 1e-6 * (size + before.abs() as f64);
                    assert!(
                        (got - want).abs() <= tol,
                        "tiled {} {blocks:?} scale {scale} ({i}, {j}): {got} vs {want}",
                        pa.tiled
                    );
                }
                assert_eq!(c[i * rs + n..(i + 1) * rs], prior[i * rs + n..(i + 1) * rs]);
            }
        }
    }

    /// A left operand past L3's share against two column panels splits by rows, and gives
    /// the bits one task gives (each number's sums run in the same order either way).
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

    /// Against an f64 product of the same bf16-rounded operands: exact up to f32 sums, so
    /// within a few f32 roundings of `sum |a||b|` per element; shapes with edges in every
    /// dimension, transposed reads, strided rows, accumulation and scale, one and two tasks;
    /// on the AVX512-BF16 kernel, then on AMX tiles (the CPU's, else emulated).
    #[test]
    fn bf16_products_equal_f64_of_the_rounded_operands() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        products_equal_f64_of_the_rounded_operands(false);
        if !amx::available() {
            eprintln!("note: this CPU has no AMX: tiled products run on the emulation");
        }
        amx::forced(|| products_equal_f64_of_the_rounded_operands(true));
    }

    /// [`bf16_products_equal_f64_of_the_rounded_operands`]'s cases, on `tiled` left operands
    /// or not.
    fn products_equal_f64_of_the_rounded_operands(tiled: bool) {
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 256),
            (25, 70, 601),
            (64, 96, 300),
            // large enough to pack in parallel (several blocks: the test above)
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
                                "{m}x{n}x{k} a_t {a_t} b_t {b_t} bf16 {bf16_operand:?} \
                                 tiled {tiled}: [{i},{j}] {got} vs {want}"
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
