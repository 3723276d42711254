//! The forward of a 3x3 conv of stride 1 padded by 1 (all but two of SD's UNet convs) as
//! Winograd's F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2015), with bf16 products. Each 2x2 block of output pixels (a *tile*) is
//! `A^T [U ⊙ V] A`, with `U = G g G^T` (4x4) the transformed 3x3 filter `g` and `V = B^T d B`
//! the transformed 4x4 input patch `d` around the tile: summed over input channels, that is 16
//! matrix products `M_ξ = U_ξ V_ξ` (`U_ξ [o, c]` one component of every transformed filter,
//! `V_ξ [c, tiles]` one of every transformed patch), 16 multiply-adds for 4 output pixels where
//! the direct conv takes 36: 2.25x fewer.
//!
//! Both transforms are exact-ish sums in f32 (`B` and `A` hold 0 and ±1, `G` halves), rounded to
//! bf16 as they are packed for the kernel; the filter is first rounded to bf16 itself, as the
//! direct products read it, so a weight kept in bf16 and its f32 original give the same bits
//! here too. The rounding happens after the transforms, so errors scale with the transformed
//! numbers: at most 4x a pixel's neighbours' magnitudes, a few bf16 steps in all (the test holds
//! each output to that bound).
//!
//! A task takes a chunk of one image's tiles: it transforms their patches into 16 packed right
//! operands (in L2), multiplies each by its `U_ξ` a block of filters at a time, and transforms
//! the 16 results back into the block's output pixels: no transformed image is ever whole.

use std::cell::Cell;

use rayon::prelude::*;

use super::fused::Geo;
use crate::cpu::bf16::{self, Panels, MR, NR};
use crate::cpu::matmul::{Data, Dst};
use crate::cpu::switch::Switch;
use crate::cpu::SendPtr;

/// Components of a transformed filter or patch (4x4).
const XI: usize = 16;

/// Tiles a task transforms and multiplies at a time (one column panel: SD 1.5's 64x64 convs,
/// 320 channels, make 330 KB of transformed patches of it).
const CHUNK_TILES: usize = NR;

/// Filters (a multiple of [`MR`]) whose 16 products a task holds at a time, before
/// transforming them back (`16 x 96 x 32` f32: 196 KB).
const ROW_BLOCK: usize = 8 * MR;

/// The environment variable that turns this forward off (`0`) for a process that does not
/// choose itself, to compare it with the direct conv (benchmarks).
pub const VAR: &str = "ATOMTUNE_WINOGRAD";

/// The switch: on by default, off by [`set_enabled`] or `ATOMTUNE_WINOGRAD=0`.
static SWITCH: Switch = Switch::new(VAR, true, "Winograd's convs");

/// Turns the Winograd forward on (the default) or off for the whole process; off, the 3x3
/// convs run the direct bf16 products.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether the Winograd forward is on: by [`set_enabled`], else unless `ATOMTUNE_WINOGRAD=0`.
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Whether the forward of `b` images runs here: a 3x3 conv of stride 1 padded by 1, with bf16
/// products on and enough channels and tiles to repay them (the caller checks that the numbers
/// are f32).
pub(super) fn applies(g: &Geo, b: usize) -> bool {
    let (th, tw) = tiles(g);
    (g.kh, g.kw, g.s, g.p) == (3, 3, 1, 1)
        && bf16::active()
        && enabled()
        && bf16::worth_it((g.o, g.c), (g.c, b * th * tw))
        && b * th * tw >= MIN_TILES
}

/// The fewest tiles (over the batch) whose products repay transforming the filters: SD 1.5's
/// 1280-channel convs at 16x16 (64 tiles an image) run 1.1x faster than the direct conv for
/// one image and 1.4x for two, at 8x8 (16 an image) no faster (`cargo run --release -p
/// atomtune-ops --example conv_rate`).
const MIN_TILES: usize = 64;

/// Tile rows and columns of an output (odd sizes: the last tiles overhang).
fn tiles(g: &Geo) -> (usize, usize) {
    (g.ho.div_ceil(2), g.wo.div_ceil(2))
}

/// `y [b, o, ho, wo] += conv(x, w)` for `b` images `x [c, h, w]` and `w [o, c, 3, 3]` (f32 or
/// bf16), on the pool's threads. `y` holds the bias, or zeros.
///
/// # Panics
/// Where the CPU lacks AVX512-BF16 (callers check [`applies`]).
pub(super) fn forward((x, w): (&[f32], Data<'_, f32>), y: &mut [f32], b: usize, g: &Geo) {
    forward_in_chunks((x, w), y, b, g, CHUNK_TILES)
}

/// [`forward`] with chunks of `chunk` tiles.
fn forward_in_chunks(
    (x, w): (&[f32], Data<'_, f32>),
    y: &mut [f32],
    b: usize,
    g: &Geo,
    chunk: usize,
) {
    assert!(bf16::supported(), "Winograd's products need AVX512-BF16");
    assert!(x.len() >= b * g.c * g.h * g.w && y.len() >= b * g.o * g.npix());
    let u = filter_panels(w, g.o, g.c);
    if XI * g.o * g.c * 2 > U_IN_L3 {
        by_filters((x, &u), y, b, g, chunk);
    } else {
        by_tiles((x, &u), y, b, g, chunk);
    }
    put_filters(u);
}

/// The most bytes of transformed filters that every chunk of tiles reads again (a share of
/// L3): past it (640+ channels: 13-52 MB), [`by_filters`].
const U_IN_L3: usize = 8 << 20;

/// The chunks of tiles of `b` images of `per_image` tiles each: `(image, (j0, j1))`.
fn chunks(b: usize, per_image: usize, chunk: usize) -> Vec<(usize, (usize, usize))> {
    let n = per_image.div_ceil(chunk);
    (0..b * n)
        .map(|i| {
            let j0 = (i % n) * chunk;
            (i / n, (j0, (j0 + chunk).min(per_image)))
        })
        .collect()
}

/// A task per chunk of tiles: it transforms the chunk's patches and meets them with every
/// filter, all of `u` read again from L3 for each chunk.
fn by_tiles((x, u): (&[f32], &[Panels]), y: &mut [f32], b: usize, g: &Geo, chunk: usize) {
    let (th, tw) = tiles(g);
    let out = SendPtr(y.as_mut_ptr());
    chunks(b, th * tw, chunk)
        .into_par_iter()
        .for_each(|(bi, span)| {
            let xb = &x[bi * g.c * g.h * g.w..(bi + 1) * g.c * g.h * g.w];
            let mut bufs = BUFS.take();
            let v = patch_panels(xb, g, span, &mut bufs.v);
            for o0 in (0..g.o).step_by(ROW_BLOCK) {
                let rows = (o0, (o0 + ROW_BLOCK).min(g.o));
                // SAFETY: the chunk's tiles cover output pixels of image `bi` that no other chunk
                // writes; `y` holds `b` images.
                unsafe {
                    block_out(
                        (u, &v),
                        rows,
                        span,
                        g,
                        (&mut bufs.m, out.get().add(bi * g.o * g.npix())),
                    )
                };
            }
            bufs.v = v.into_iter().map(Panels::into_buffer).collect();
            BUFS.set(bufs);
        });
}

/// Where the transformed filters outgrow L3, so that each chunk re-reading them all would
/// stream them from memory again (SD's 1280-channel convs at 16x16: 52 MB for 64 tiles an
/// image): every chunk's patches are transformed first, then a task per block of filters
/// meets each chunk with its block, whose 16 components' rows stay in L3.
fn by_filters((x, u): (&[f32], &[Panels]), y: &mut [f32], b: usize, g: &Geo, chunk: usize) {
    let (th, tw) = tiles(g);
    let spans = chunks(b, th * tw, chunk);
    let v: Vec<Vec<Panels>> = spans
        .par_iter()
        .map(|&(bi, span)| {
            let xb = &x[bi * g.c * g.h * g.w..(bi + 1) * g.c * g.h * g.w];
            patch_panels(xb, g, span, &mut Vec::new())
        })
        .collect();
    // blocks of filters enough for every thread (half blocks below 8)
    let block = if g.o >= 8 * ROW_BLOCK {
        ROW_BLOCK
    } else {
        ROW_BLOCK / 2
    };
    let out = SendPtr(y.as_mut_ptr());
    (0..g.o.div_ceil(block)).into_par_iter().for_each(|k| {
        let rows = (k * block, ((k + 1) * block).min(g.o));
        let mut m = Vec::new();
        for (&(bi, span), v) in spans.iter().zip(&v) {
            // SAFETY: this task alone writes channels `rows` of every image; `y` holds `b`.
            unsafe {
                block_out(
                    (u, v),
                    rows,
                    span,
                    g,
                    (&mut m, out.get().add(bi * g.o * g.npix())),
                )
            };
        }
    });
}

/// The 16 products of filters `o0..o1` with one chunk's transformed patches (tiles `span`),
/// into `m`, and their output pixels added to image `y` (`A^T m A`).
///
/// # Safety
/// `applies` (or the caller) checked the instructions; `y` valid for the image's writes,
/// whose channels `o0..o1` at these tiles no one else touches meanwhile.
unsafe fn block_out(
    (u, v): (&[Panels], &[Panels]),
    (o0, o1): (usize, usize),
    span: (usize, usize),
    g: &Geo,
    (m, y): (&mut Vec<f32>, *mut f32),
) {
    let cols = span.1 - span.0;
    m.resize(XI * ROW_BLOCK * cols, 0.0);
    for (xi, (u, v)) in u.iter().zip(v).enumerate() {
        let dst = Dst {
            ptr: m[xi * ROW_BLOCK * cols..].as_mut_ptr(),
            rs: cols,
        };
        // SAFETY: the caller's promise; `dst` holds `o1 - o0 <= ROW_BLOCK` rows of `cols`.
        unsafe { bf16::multiply(dst, u.all().lines((o0, o1)), v.all(), 1.0, false) };
    }
    // SAFETY: the caller's promise.
    unsafe { untransform(m, (o0, o1), span, g, y) };
}

/// `dx [b, c, h, w] += dL/dx` of the conv [`forward`] runs, from `dy [b, o, h, w]`: the input
/// gradient of a 3x3 conv of stride 1 padded by 1 is the same kind of conv of `dy` with each
/// filter flipped in both directions and the channels swapped (`W~[c][o] = W[o][c]` turned
/// 180 degrees), so Winograd's products serve it too (frozen convs' backward: LoRA's and the
/// other methods' training). `false`, with nothing done, where [`applies`] does not hold for
/// that conv. `dx` holds zeros (or what to add to).
pub(super) fn input_grad(
    (w, dy): (Data<'_, f32>, &[f32]),
    dx: &mut [f32],
    b: usize,
    g: &Geo,
) -> bool {
    let t = transposed(g);
    // the flipped copy of the weight costs as much as the products save below twice the
    // forward's tiles (1280 channels at 16x16, one image: 43 ms against the direct 26)
    let (th, tw) = tiles(&t);
    if !applies(&t, b) || b * th * tw < 2 * MIN_TILES {
        return false;
    }
    transposed_conv((w, dy), dx, b, g);
    true
}

/// The geometry of a conv's transposed conv (its input gradient): `o` channels of `ho x wo`
/// in, `c` of `h x w` out, same kernel, stride and padding.
fn transposed(g: &Geo) -> Geo {
    Geo {
        c: g.o,
        h: g.ho,
        w: g.wo,
        o: g.c,
        ho: g.h,
        wo: g.w,
        ..*g
    }
}

/// [`input_grad`]'s work, where it applies: [`forward`] of `dy` with the flipped, transposed
/// filters, at the transposed geometry.
fn transposed_conv((w, dy): (Data<'_, f32>, &[f32]), dx: &mut [f32], b: usize, g: &Geo) {
    let t = transposed(g);
    match w {
        Data::Plain(w) => forward((dy, Data::Plain(&flipped(w, g))), dx, b, &t),
        Data::Bf16(w) => forward((dy, Data::Bf16(&flipped(w, g))), dx, b, &t),
    }
}

/// `W~ [c, o, 3, 3]` with `W~[c][o][i][j] = W[o][c][2 - i][2 - j]`: the filters of `w [o, c, 3,
/// 3]` turned 180 degrees, input and output channels swapped.
fn flipped<T: Copy + Default + Send + Sync>(w: &[T], g: &Geo) -> Vec<T> {
    let mut f = vec![T::default(); w.len()];
    // a row of `W~` (one input channel) per task
    f.par_chunks_mut(g.o * 9).enumerate().for_each(|(c, row)| {
        for (at, v) in row.iter_mut().enumerate() {
            *v = w[(at / 9 * g.c + c) * 9 + 8 - at % 9];
        }
    });
    f
}

/// A task's buffers, reused by the next chunk on its thread.
#[derive(Default)]
struct Bufs {
    /// The 16 packed operands of transformed patches.
    v: Vec<Vec<u32>>,
    /// The 16 products of a block of filters, `[ξ, ROW_BLOCK, tiles]`.
    m: Vec<f32>,
}

thread_local! {
    static BUFS: Cell<Bufs> = Cell::default();
}

/// The 16 components `U_ξ [o, c]` of the transformed filters `G g G^T` of `w [o, c, 3, 3]`
/// (each filter rounded to bf16 first), packed as left operands in one pass over `w`: a task
/// per panel of [`MR`] filters, a vector's lanes holding the panel's filters of one input
/// channel. Into the calling thread's buffers, which every word of is written.
fn filter_panels(w: Data<'_, f32>, o: usize, c: usize) -> Vec<Panels> {
    let cp = c.div_ceil(2);
    let panel = cp * MR;
    let len = o.div_ceil(MR) * panel;
    assert!(w.len() == o * c * 9 && w.len() < i32::MAX as usize);
    let mut words = FILTERS.take();
    words.resize_with(XI, Vec::new);
    for v in words.iter_mut() {
        // every word is written below: only a grown part needs initialising
        v.resize(len, 0);
    }
    let dst: Vec<SendPtr<u32>> = words.iter_mut().map(|v| SendPtr(v.as_mut_ptr())).collect();
    (0..o.div_ceil(MR)).into_par_iter().for_each(|p| {
        for q in 0..cp {
            // SAFETY: `applies` checked the instructions; pair `q` of panel `p` in each
            // component is this task's alone, and the buffers hold every panel.
            unsafe { filter_words(w, (o, c), (p, q), &dst, (p * cp + q) * MR) };
        }
    });
    words
        .into_iter()
        .map(|v| Panels::from_words(v, (o, cp), MR))
        .collect()
}

thread_local! {
    /// The last forward's packed filters on this thread, reused by the next.
    static FILTERS: Cell<Vec<Vec<u32>>> = Cell::default();
}

/// Gives the filter buffers back for the next forward on this thread.
fn put_filters(u: Vec<Panels>) {
    FILTERS.set(u.into_iter().map(Panels::into_buffer).collect());
}

/// The pair words of input channels `2q` and `2q + 1` of the [`MR`] filters of panel `p`
/// (zeros past `o` and `c`), written at `at` of each component's buffer. The 18 gathers (9 taps
/// of 2 channels, a lane per filter) are issued back to back, so that their loads overlap.
///
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be present; each buffer holds `at + MR` words that no one else
/// touches meanwhile; `w` holds `o c 9` numbers, fewer than `i32::MAX`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn filter_words(
    w: Data<'_, f32>,
    (o, c): (usize, usize),
    (p, q): (usize, usize),
    dst: &[SendPtr<u32>],
    at: usize,
) {
    use std::arch::x86_64::*;
    let o0 = p * MR;
    let rows = MR.min(o - o0);
    let mask = crate::cpu::bf16::first_lanes(rows);
    let zero = _mm512_setzero_ps();
    let mut taps = [[zero; 9]; 2];
    // SAFETY: the gathers read filters of rows `o0..o0 + rows` (masked), of channels below
    // `c`: within `w`; a bf16 gather reads each number's 4 bytes, 2 past it, so the channel
    // whose last tap ends `w` takes the scalar path; the stores write `MR` words at `at`.
    unsafe {
        let lane_rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(lane_rows, _mm512_set1_epi32((c * 9) as i32));
        // the gathers walk 12 rows of `w` at once, which the hardware's prefetchers do not
        // follow: fetch each row's numbers 16 channels ahead
        let ahead = (o0 * c + 2 * q + 16) * 9;
        for r in 0..rows {
            let at = ahead + r * c * 9;
            match w {
                Data::Plain(w) if at < w.len() => {
                    _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(at).cast())
                }
                Data::Bf16(w) if at < w.len() => {
                    _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(at).cast())
                }
                _ => {}
            }
        }
        for (half, g) in taps.iter_mut().enumerate() {
            let ch = 2 * q + half;
            if ch >= c {
                continue;
            }
            let base = (o0 * c + ch) * 9;
            match w {
                Data::Plain(w) => {
                    for (t, g) in g.iter_mut().enumerate() {
                        let v = _mm512_mask_i32gather_ps::<4>(
                            zero,
                            mask,
                            idx,
                            w.as_ptr().add(base + t),
                        );
                        *g = crate::cpu::bf16::round16(v);
                    }
                }
                Data::Bf16(w) if base + (rows - 1) * c * 9 + 9 < w.len() => {
                    let z = _mm512_setzero_si512();
                    for (t, g) in g.iter_mut().enumerate() {
                        let at = w.as_ptr().add(base + t).cast();
                        let bits = _mm512_mask_i32gather_epi32::<2>(z, mask, idx, at);
                        *g = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits));
                    }
                }
                Data::Bf16(w) => {
                    for (t, g) in g.iter_mut().enumerate() {
                        let lane = |r: usize| {
                            if r < rows {
                                w[base + t + r * c * 9].to_f32()
                            } else {
                                0.0
                            }
                        };
                        let v: [f32; 16] = std::array::from_fn(lane);
                        *g = _mm512_loadu_ps(v.as_ptr());
                    }
                }
            }
        }
        let (lo, hi) = (transform_filters(&taps[0]), transform_filters(&taps[1]));
        let store = crate::cpu::bf16::first_lanes(MR);
        for (xi, d) in dst.iter().enumerate() {
            let words = crate::cpu::bf16::pair16(lo[xi], hi[xi]);
            _mm512_mask_storeu_epi32(d.get().add(at).cast(), store, words);
        }
    }
}

/// `G g G^T` of 16 filters at once (a lane each), from their 9 taps (row-major), as 16
/// components `4 a + b`. `G`'s rows: `g0`, `(g0 + g1 + g2) / 2`, `(g0 - g1 + g2) / 2`, `g2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transform_filters(g: &[std::arch::x86_64::__m512; 9]) -> [std::arch::x86_64::__m512; XI] {
    use std::arch::x86_64::*;
    let half = _mm512_set1_ps(0.5);
    let side = |a: __m512, b: __m512, c: __m512| {
        let ac = _mm512_add_ps(a, c);
        [
            a,
            _mm512_mul_ps(half, _mm512_add_ps(ac, b)),
            _mm512_mul_ps(half, _mm512_sub_ps(ac, b)),
            c,
        ]
    };
    let cols = [
        side(g[0], g[3], g[6]),
        side(g[1], g[4], g[7]),
        side(g[2], g[5], g[8]),
    ];
    let mut u = [_mm512_setzero_ps(); XI];
    for a in 0..4 {
        let row = side(cols[0][a], cols[1][a], cols[2][a]);
        u[4 * a..4 * a + 4].copy_from_slice(&row);
    }
    u
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn filter_words(
    _: Data<'_, f32>,
    _: (usize, usize),
    _: (usize, usize),
    _: &[SendPtr<u32>],
    _: usize,
) {
    unreachable!("bf16 products need x86_64")
}

/// Runs of at most 16 tiles of `j0..j1` (row-major over an image's `tw` tile columns) that
/// lie in one row of tiles and one column panel of the chunk: `(ty, tx0, jj, n)`, the run's
/// tile row, first tile column, first tile counted from `j0`, and length. A run's tiles are one
/// vector's lanes in the transforms.
fn runs((j0, j1): (usize, usize), tw: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut t = j0;
    std::iter::from_fn(move || {
        if t >= j1 {
            return None;
        }
        let (ty, tx0, jj) = (t / tw, t % tw, t - j0);
        let end = j1
            .min((ty + 1) * tw)
            .min(t + 16)
            .min(j0 + (jj / NR + 1) * NR);
        let run = (ty, tx0, jj, end - t);
        t = end;
        Some(run)
    })
}

/// The transformed patches of tiles `j0..j1` (row-major over the image's tiles) of one image
/// `x [c, h, w]` as 16 right operands `V_ξ [c, j1 - j0]`, packed into `bufs` (reused). For each
/// row of tiles and pair of channels, the pair's 4 input rows are copied between zeros (the
/// padding), then each run of tiles is transformed a vector at a time.
fn patch_panels(
    x: &[f32],
    g: &Geo,
    (j0, j1): (usize, usize),
    bufs: &mut Vec<Vec<u32>>,
) -> Vec<Panels> {
    let (cp, n, tw) = (g.c.div_ceil(2), j1 - j0, tiles(g).1);
    let len = n.div_ceil(NR) * cp * NR;
    bufs.resize_with(XI, Vec::new);
    for v in bufs.iter_mut() {
        v.resize(len, 0);
        // the last panel's columns past the chunk: zero (the runs' stores skip them)
        if !n.is_multiple_of(NR) {
            for q in 0..cp {
                let at = ((n / NR) * cp + q) * NR;
                v[at + n % NR..at + NR].fill(0);
            }
        }
    }
    // 4 rows of each channel of the pair, with a zero column before and 32 after: a run's
    // loads reach 34 columns past its first
    let width = 2 * tw + 34;
    let mut rows = vec![0.0f32; 8 * width];
    let plane = g.h * g.w;
    for ty in j0 / tw..=(j1 - 1) / tw {
        for q in 0..cp {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                let (ch, y) = (2 * q + i / 4, (2 * ty + i % 4) as isize - 1);
                if ch < g.c && y >= 0 && (y as usize) < g.h {
                    let at = ch * plane + y as usize * g.w;
                    row[1..=g.w].copy_from_slice(&x[at..at + g.w]);
                } else {
                    row.fill(0.0);
                }
            }
            for (rty, tx0, jj, run) in runs((j0, j1), tw) {
                if rty != ty {
                    continue;
                }
                let at = (jj / NR * cp + q) * NR + jj % NR;
                // SAFETY: `applies` (and `forward_in_chunks`) checked the instructions; the
                // run's loads stay within `rows` (see `width`), its stores within each buffer.
                unsafe { transform_run(&rows, width, (tx0, run), bufs, at) };
            }
        }
    }
    bufs.drain(..)
        .map(|v| Panels::from_words(v, (n, cp), NR))
        .collect()
}

/// `B^T d B` of `n <= 16` consecutive tiles from tile column `tx0` of a pair of channels' padded
/// rows (`rows [2, 4, width]`), stored as pair words at `at` of each component's buffer.
///
/// # Safety
/// AVX512F, AVX512BW and AVX512-BF16 must be present; `2 tx0 + 34 <= width`; each buffer holds `at + n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transform_run(
    rows: &[f32],
    width: usize,
    (tx0, n): (usize, usize),
    bufs: &mut [Vec<u32>],
    at: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's promise: every load reads `rows`, every store a buffer's `n` words.
    unsafe {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        // one channel's 16 components for the run's tiles, as lanes
        let transform = |rows: &[f32]| -> [__m512; XI] {
            let mut r = [[_mm512_setzero_ps(); 4]; 4];
            for (i, ri) in r.iter_mut().enumerate() {
                let p = rows.as_ptr().add(i * width + 2 * tx0);
                let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                let (c, d) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
                // the patch's 4 columns: 2 tx - 1 + 0..4 of the image, tile tx in lane tx - tx0
                let d0 = _mm512_permutex2var_ps(a, even, b);
                let d1 = _mm512_permutex2var_ps(a, odd, b);
                let d2 = _mm512_permutex2var_ps(c, even, d);
                let d3 = _mm512_permutex2var_ps(c, odd, d);
                *ri = [
                    _mm512_sub_ps(d0, d2),
                    _mm512_add_ps(d1, d2),
                    _mm512_sub_ps(d2, d1),
                    _mm512_sub_ps(d1, d3),
                ];
            }
            let mut v = [_mm512_setzero_ps(); XI];
            for b in 0..4 {
                v[b] = _mm512_sub_ps(r[0][b], r[2][b]);
                v[4 + b] = _mm512_add_ps(r[1][b], r[2][b]);
                v[8 + b] = _mm512_sub_ps(r[2][b], r[1][b]);
                v[12 + b] = _mm512_sub_ps(r[1][b], r[3][b]);
            }
            v
        };
        let (lo, hi) = (transform(&rows[..4 * width]), transform(&rows[4 * width..]));
        let mask = crate::cpu::bf16::first_lanes(n);
        for (xi, buf) in bufs.iter_mut().enumerate() {
            let words = crate::cpu::bf16::pair16(lo[xi], hi[xi]);
            _mm512_mask_storeu_epi32(buf.as_mut_ptr().add(at).cast(), mask, words);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_run(_: &[f32], _: usize, _: (usize, usize), _: &mut [Vec<u32>], _: usize) {
    unreachable!("bf16 products need x86_64")
}

/// Adds the output pixels of filters `o0..o1` and tiles `j0..j1` to image `y [o, ho, wo]`,
/// transformed back (`A^T m A`) from their 16 products `m [ξ, ROW_BLOCK, j1 - j0]`, a run of
/// tiles at a time.
///
/// # Safety
/// AVX512F must be present; `y` valid for the image's writes, whose pixels of these tiles no
/// one else touches meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn untransform(
    m: &[f32],
    (o0, o1): (usize, usize),
    (j0, j1): (usize, usize),
    g: &Geo,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let (n, tw) = (j1 - j0, tiles(g).1);
    assert!(m.len() >= XI * ROW_BLOCK * n && o1 - o0 <= ROW_BLOCK);
    // SAFETY: loads within `m` (asserted), stores within the caller's pixels.
    unsafe {
        // the two pixels of each tile's row side by side: lanes 0..8 and 8..16 of both
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        let add = |at: *mut f32, v: __m512, lanes: usize| {
            let mask = crate::cpu::bf16::first_lanes(lanes);
            let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), v);
            _mm512_mask_storeu_ps(at, mask, sum);
        };
        for (r, oi) in (o0..o1).enumerate() {
            for (ty, tx0, jj, run) in runs((j0, j1), tw) {
                let mask = crate::cpu::bf16::first_lanes(run);
                let p: [__m512; XI] = std::array::from_fn(|xi| {
                    _mm512_maskz_loadu_ps(mask, m.as_ptr().add((xi * ROW_BLOCK + r) * n + jj))
                });
                let s: [__m512; 4] =
                    std::array::from_fn(|b| _mm512_add_ps(_mm512_add_ps(p[b], p[4 + b]), p[8 + b]));
                let d: [__m512; 4] = std::array::from_fn(|b| {
                    _mm512_sub_ps(_mm512_sub_ps(p[4 + b], p[8 + b]), p[12 + b])
                });
                let pixels = (2 * run).min(g.wo - 2 * tx0);
                for (a, t) in [s, d].iter().enumerate() {
                    let py = 2 * ty + a;
                    if py >= g.ho {
                        continue;
                    }
                    let left = _mm512_add_ps(_mm512_add_ps(t[0], t[1]), t[2]);
                    let right = _mm512_sub_ps(_mm512_sub_ps(t[1], t[2]), t[3]);
                    let at = y.add((oi * g.ho + py) * g.wo + 2 * tx0);
                    add(
                        at,
                        _mm512_permutex2var_ps(left, first, right),
                        pixels.min(16),
                    );
                    if pixels > 16 {
                        let rest = _mm512_permutex2var_ps(left, second, right);
                        add(at.add(16), rest, pixels - 16);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn untransform(_: &[f32], _: (usize, usize), _: (usize, usize), _: &Geo, _: *mut f32) {
    unreachable!("bf16 products need x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::ConvConfig;

    /// Numbers of a fixed pattern in `-span..=span` (integers) for `n` places.
    fn integers(n: usize, span: i64, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + seed * 40503) % (2 * span as u64 + 1)) as i64 - span)
            .map(|v| v as f32)
            .collect()
    }

    /// Uniform-ish numbers in -1..1 (a fixed LCG).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 23) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn geo(b: usize, c: usize, (h, w): (usize, usize), o: usize) -> Geo {
        let cfg = ConvConfig {
            stride: 1,
            padding: 1,
        };
        Geo::new(&[b, c, h, w], &[o, c, 3, 3], cfg).unwrap()
    }

    /// `m x m^T` for a matrix `m [R, K]` and `x [K, K]`: a 2-d transform.
    fn sandwich<const R: usize, const K: usize>(
        m: &[[f64; K]; R],
        x: &[[f64; K]; K],
    ) -> [[f64; R]; R] {
        std::array::from_fn(|a| {
            std::array::from_fn(|b| {
                let mut s = 0.0;
                for (i, row) in x.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        s += m[a][i] * m[b][j] * v;
                    }
                }
                s
            })
        })
    }

    /// The direct conv in f64 of `x` and `w` (as given), and beside it, for each output, the
    /// sum of the absolute values of its terms after the transforms of F(2x2, 3x3), written as
    /// matrices (not the code's expanded sums): what bounds the rounding of `U` and `V`.
    fn reference(x: &[f32], w: &[f32], b: usize, g: &Geo) -> (Vec<f64>, Vec<f64>) {
        const G: [[f64; 3]; 4] = [
            [1., 0., 0.],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0., 0., 1.],
        ];
        const BT: [[f64; 4]; 4] = [
            [1., 0., -1., 0.],
            [0., 1., 1., 0.],
            [0., -1., 1., 0.],
            [0., 1., 0., -1.],
        ];
        const AT: [[f64; 4]; 2] = [[1., 1., 1., 0.], [0., 1., -1., -1.]];
        let px = |bi: usize, c: usize, yy: isize, xx: isize| -> f64 {
            if yy < 0 || xx < 0 || yy >= g.h as isize || xx >= g.w as isize {
                return 0.0;
            }
            x[((bi * g.c + c) * g.h + yy as usize) * g.w + xx as usize] as f64
        };
        let n = b * g.o * g.npix();
        let (mut exact, mut bound) = (vec![0.0; n], vec![0.0; n]);
        for (at, (e, s)) in exact.iter_mut().zip(&mut bound).enumerate() {
            let (bi, o, py, pxx) = (
                at / (g.o * g.npix()),
                at / g.npix() % g.o,
                at % g.npix() / g.wo,
                at % g.wo,
            );
            let (y0, x0) = (2 * (py / 2) as isize - 1, 2 * (pxx / 2) as isize - 1);
            for c in 0..g.c {
                let f: [[f64; 3]; 3] = std::array::from_fn(|i| {
                    std::array::from_fn(|j| w[((o * g.c + c) * 3 + i) * 3 + j] as f64)
                });
                for (i, row) in f.iter().enumerate() {
                    for (j, &wv) in row.iter().enumerate() {
                        *e += wv * px(bi, c, (py + i) as isize - 1, (pxx + j) as isize - 1);
                    }
                }
                let d: [[f64; 4]; 4] = std::array::from_fn(|i| {
                    std::array::from_fn(|j| px(bi, c, y0 + i as isize, x0 + j as isize))
                });
                let (u, v) = (sandwich(&G, &f), sandwich(&BT, &d));
                let (ra, rb) = (AT[py % 2], AT[pxx % 2]);
                for a in 0..4 {
                    for bb in 0..4 {
                        *s += (ra[a] * rb[bb] * u[a][bb] * v[a][bb]).abs();
                    }
                }
            }
        }
        (exact, bound)
    }

    fn run(x: &[f32], w: Data<'_, f32>, b: usize, g: &Geo, chunk: usize) -> Vec<f32> {
        let mut y = vec![0.0; b * g.o * g.npix()];
        forward_in_chunks((x, w), &mut y, b, g, chunk);
        y
    }

    #[test]
    fn small_integers_give_the_direct_conv_exactly() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        // odd channels (a pair half empty), filters past one block, odd sizes (tiles overhang);
        // rows of more tiles than a vector's lanes, odd and even
        for (b, c, (h, w), o) in [
            (2, 21, (9, 11), 101),
            (1, 6, (5, 70), 14),
            (1, 3, (4, 67), 5),
        ] {
            let g = geo(b, c, (h, w), o);
            let x = integers(b * g.c * g.h * g.w, 3, 1);
            let w = integers(g.o * g.c * 9, 2, 2);
            let (exact, _) = reference(&x, &w, b, &g);
            // every transformed number is a multiple of 1/4 below 64: exact in bf16, and so
            // are the products and their sums in f32
            for chunk in [7, 32, 64] {
                let y = run(&x, Data::Plain(&w), b, &g, chunk);
                for (i, (&y, &e)) in y.iter().zip(&exact).enumerate() {
                    assert_eq!(y as f64, e, "{:?}, chunk {chunk}, output {i}", (b, c, h, o));
                }
                // and a task per block of filters, as for filters past L3
                let u = filter_panels(Data::Plain(&w), g.o, g.c);
                let mut y = vec![0.0; b * g.o * g.npix()];
                by_filters((&x, &u), &mut y, b, &g, chunk);
                for (i, (&y, &e)) in y.iter().zip(&exact).enumerate() {
                    assert_eq!(y as f64, e, "by filters, chunk {chunk}, output {i}");
                }
            }
        }
    }

    #[test]
    fn the_input_gradient_is_the_transposed_conv() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        // odd sizes and channel counts; the filters' both flips and the channel swap all show
        let (b, g) = (2, geo(2, 23, (9, 11), 30));
        let dy = integers(b * g.o * g.npix(), 3, 5);
        let w = integers(g.o * g.c * 9, 2, 6);
        // dx[c][y][x] = sum over o, i, j of W[o][c][i][j] dy[o][y + 1 - i][x + 1 - j]
        let mut want = vec![0f64; b * g.c * g.h * g.w];
        for (at, v) in want.iter_mut().enumerate() {
            let (bi, c, y, x) = (
                at / (g.c * g.h * g.w),
                at / (g.h * g.w) % g.c,
                at / g.w % g.h,
                at % g.w,
            );
            for o in 0..g.o {
                for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
                    let (yy, xx) = ((y + 1) as isize - i as isize, (x + 1) as isize - j as isize);
                    if yy < 0 || xx < 0 || yy >= g.ho as isize || xx >= g.wo as isize {
                        continue;
                    }
                    let d = dy[((bi * g.o + o) * g.ho + yy as usize) * g.wo + xx as usize];
                    *v += w[((o * g.c + c) * 3 + i) * 3 + j] as f64 * d as f64;
                }
            }
        }
        let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        for w in [Data::Plain(&w[..]), Data::Bf16(&w16[..])] {
            let mut dx = vec![0f32; want.len()];
            transposed_conv((w, &dy), &mut dx, b, &g);
            // small integers: every transformed number exact, as in the forward's test
            for (i, (&got, &e)) in dx.iter().zip(&want).enumerate() {
                assert_eq!(got as f64, e, "dx {i}");
            }
        }
    }

    #[test]
    fn roundings_stay_within_their_bound() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let (b, g) = (1, geo(1, 30, (8, 7), 13));
        let x = values(b * g.c * g.h * g.w, 3);
        let w: Vec<f32> = values(g.o * g.c * 9, 4)
            .into_iter()
            .map(bf16::round)
            .collect();
        let (exact, bound) = reference(&x, &w, b, &g);
        let y = run(&x, Data::Plain(&w), b, &g, 32);
        let mut worst: f64 = 0.0;
        for (i, ((&y, &e), &s)) in y.iter().zip(&exact).zip(&bound).enumerate() {
            // U and V each rounded to bf16 (2^-9 relative), f32 sums of 16 c terms
            let err = (y as f64 - e).abs();
            assert!(
                err <= s * (2f64.powi(-8) + 1e-5),
                "output {i}: {y} vs {e}, bound {s}"
            );
            worst = worst.max(err / s);
        }
        // and the roundings do happen: the bound is not loose by orders of magnitude
        assert!(worst > 2f64.powi(-12), "worst error {worst} of the bound");
    }

    #[test]
    fn a_bf16_filter_and_its_f32_original_give_the_same_bits() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let (b, g) = (1, geo(1, 16, (6, 6), 12));
        let x = values(b * g.c * g.h * g.w, 5);
        let w = values(g.o * g.c * 9, 6);
        let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let a = run(&x, Data::Plain(&w), b, &g, 32);
        let c = run(&x, Data::Bf16(&w16), b, &g, 32);
        assert!(a.iter().zip(&c).all(|(a, c)| a.to_bits() == c.to_bits()));
    }
}
