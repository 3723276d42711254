//! A conv's forward with bf16 products (what `--dtype bf16` runs on a CPU with AVX512-BF16):
//! the im2col matrix is never written in f32. Each panel of 32 output pixels of it is packed for
//! the bf16 kernel straight from the image, a chunk of panels at a time that stays in L2 while it
//! is multiplied ([`bf16::gemm_right_from`]), and the output is written in place. The f32 path's
//! `cols` (SD 1.5's 64x64 convs: 47-94 MB) cost a zeroing pass, a written pass and the packer's
//! read of it; here the image's rows are read from cache as each panel is packed.

use rayon::prelude::*;

use super::fused::{im2col_run, im2col_slice, Geo, Tap};
use crate::cpu::bf16::{self, pair_run, Panels, Scratch, MR, NR};
use crate::cpu::matmul::{Data, Dst, Mat};
use crate::cpu::{as_f32, from_f32, Float};
use crate::weight_cache::{Kept, Use};

/// Whether the forward runs here: bf16 products on, for a product that repays them (the
/// caller checks that the numbers are f32).
pub(super) fn applies(g: &Geo) -> bool {
    bf16::active() && bf16::worth_it((g.o, g.k()), (g.k(), g.npix()))
}

/// `y [b, o, npix] (+)= w cols_b` for each image `x_b`, `w [o, k]` (f32 or bf16), `cols_b` its
/// im2col matrix `[k, npix]`, packed by chunks of panels that stay in L2
/// ([`bf16::gemm_right_from`]); `accumulate` when `y` holds a bias.
pub(super) fn forward(
    x: (&[f32], Data<'_, f32>),
    y: &mut [f32],
    b: usize,
    g: &Geo,
    accumulate: bool,
) {
    forward_in_chunks(x, y, b, g, (bf16::CHUNK_BYTES, accumulate))
}

/// [`forward`] with chunks of at most `budget` bytes of packed columns (but one panel).
fn forward_in_chunks(
    (x, w): (&[f32], Data<'_, f32>),
    y: &mut [f32],
    b: usize,
    g: &Geo,
    (budget, accumulate): (usize, bool),
) {
    let (npix, k) = (g.npix(), g.k());
    // the weights' panels hold this thread's left buffer; the tasks pack columns into theirs
    let weights = Panels::left(&Mat::new(w, g.o, k), Scratch::take_left());
    // the taps of each pair of im2col rows, once for every panel that reads them
    let taps: Vec<(Tap, Option<Tap>)> = (0..k.div_ceil(2))
        .map(|q| (g.tap(2 * q), (2 * q + 1 < k).then(|| g.tap(2 * q + 1))))
        .collect();
    for (xb, yb) in x
        .chunks_exact(g.c * g.h * g.w)
        .zip(y.chunks_exact_mut(g.o * npix))
        .take(b)
    {
        let pairs = |q, j0, words: &mut [u32; NR]| {
            let end = npix.min(j0 + NR);
            panel_pairs(xb, g, &taps[q], (j0, end), words)
        };
        let dst = Dst {
            ptr: yb.as_mut_ptr(),
            rs: npix,
        };
        // SAFETY: `applies` checked the instructions; `dst` is this image's `[o, npix]` output,
        // which only this call writes.
        unsafe {
            bf16::gemm_right_from(dst, &weights, (k, npix), pairs, (1.0, accumulate), budget)
        };
    }
    Scratch::put_left(weights.into_buffer());
}

/// Bytes of column-gradient rows a task of [`column_grads`] holds at a time (in L2).
const GROUP_BYTES: usize = 512 << 10;

thread_local! {
    /// A task's rows of `dcols`, reused by the next group on this thread.
    static ROWS: std::cell::Cell<Vec<f32>> = std::cell::Cell::default();
}

/// The column gradient `dcols = W^T dy` of one image (`w [o, k]`, `dy [o, npix]`) handed out by
/// input channel: `each(c, rows)` gets channel `c`'s `kh kw` rows (`[kh kw, npix]`), and what
/// it returns comes back in channel order. Tasks take groups of channels whose rows fit in L2,
/// multiply them with bf16 products and hand them out at once, so `dcols` (47-94 MB at SD 1.5's
/// 64x64 convs, written, then read again) is never whole in memory. `None`, with nothing done,
/// where bf16 products do not run (numbers not f32, products off or too small to repay them).
/// `W^T`'s panels come from `kept` where the layer keeps them.
pub(super) fn column_grads<T: Float, R: Send>(
    (w, dy): (Data<'_, T>, &[T]),
    g: &Geo,
    each: impl Fn(usize, &[T]) -> R + Sync,
    kept: Option<&Kept>,
) -> Option<Vec<R>> {
    if !bf16::active() {
        return None;
    }
    column_grads_in_groups((w, dy), g, each, (GROUP_BYTES, kept))
}

/// [`column_grads`] with groups of about `budget` bytes of rows (but whole panels of rows),
/// where the CPU has the bf16 products (on or not).
fn column_grads_in_groups<T: Float, R: Send>(
    (w, dy): (Data<'_, T>, &[T]),
    g: &Geo,
    each: impl Fn(usize, &[T]) -> R + Sync,
    (budget, kept): (usize, Option<&Kept>),
) -> Option<Vec<R>> {
    let (npix, k, d) = (g.npix(), g.k(), g.kh * g.kw);
    let applies = bf16::supported() && bf16::worth_it((k, g.o), (g.o, npix));
    let (Some(w), Some(dy), true) = (w.as_f32(), as_f32(dy), applies) else {
        return None;
    };
    // W^T's panels: the layer's kept ones, or packed here into this thread's buffer
    let w_t = Mat::new(w, g.o, k).t();
    let pack = |buf| Panels::left(&w_t, buf);
    let kept = kept.and_then(|kept| kept.panels(Use::ConvColumnGrads, || pack(Vec::new())));
    let own = kept.is_none().then(|| pack(Scratch::take_left()));
    let wt = kept
        .as_deref()
        .or(own.as_ref())
        .expect("kept or packed here");
    let dyp = Panels::right(&Mat::new(dy, g.o, npix), Scratch::take_right());
    // a group's rows start a panel: a multiple of lcm(d, MR) rows, `unit` channels
    let unit = MR / gcd(d, MR);
    let per = (budget / (unit * d * npix * 4)).max(1) * unit;
    let group = |gi: usize| -> Vec<R> {
        let (c0, c1) = (gi * per, ((gi + 1) * per).min(g.c));
        let len = (c1 - c0) * d * npix;
        let mut rows = ROWS.take();
        rows.resize(len, 0.0);
        let dst = Dst {
            ptr: rows.as_mut_ptr(),
            rs: npix,
        };
        // SAFETY: `applies` checked the instructions; `rows` holds the group's `(c1 - c0) d`
        // rows of `npix`, which only this task writes.
        unsafe { bf16::multiply(dst, wt.all().lines((c0 * d, c1 * d)), dyp.all(), 1.0, false) };
        let rows_t = from_f32::<T>(&rows[..len]).expect("T is f32, as dy is");
        let out = (c0..c1)
            .map(|c| each(c, &rows_t[(c - c0) * d * npix..(c - c0 + 1) * d * npix]))
            .collect();
        ROWS.set(rows);
        out
    };
    let groups: Vec<Vec<R>> = (0..g.c.div_ceil(per)).into_par_iter().map(group).collect();
    if let Some(own) = own {
        Scratch::put_left(own.into_buffer());
    }
    Scratch::put_right(dyp.into_buffer());
    Some(groups.into_iter().flatten().collect())
}

/// The greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The pair words of two rows of one image's im2col matrix (`taps`: rows `2q` and `2q + 1`, if
/// there is one) at output pixels `j0..end` (`end - j0 <= NR`), zeros past them: read straight
/// from the image where both rows' pixels lie in it side by side (a panel inside one row of a
/// stride-1 conv, away from the padding: most of them), else gathered row by row of the output.
fn panel_pairs(
    x: &[f32],
    g: &Geo,
    taps: &(Tap, Option<Tap>),
    (j0, end): (usize, usize),
    words: &mut [u32; NR],
) {
    let (oy, ox) = (j0 / g.wo, j0 % g.wo);
    if end - j0 == NR && ox + NR <= g.wo {
        let inside = |tap| im2col_slice(x, g, tap, (oy, ox), NR);
        if let (Some(lo), Some(Some(hi))) = (inside(&taps.0), taps.1.as_ref().map(inside)) {
            return pair_run(lo, hi, words);
        }
    }
    let (mut lo, mut hi) = ([0f32; NR], [0f32; NR]);
    panel_row(x, g, &taps.0, (j0, end), &mut lo);
    if let Some(tap) = &taps.1 {
        panel_row(x, g, tap, (j0, end), &mut hi);
    }
    pair_run(&lo, &hi, words);
}

/// Row `tap` of one image's im2col matrix at output pixels `j0..end`, rows of the output in
/// turn; `out` past them is left as it is.
fn panel_row(x: &[f32], g: &Geo, tap: &Tap, (j0, end): (usize, usize), out: &mut [f32; NR]) {
    let mut j = j0;
    while j < end {
        let (oy, ox) = (j / g.wo, j % g.wo);
        let run = (g.wo - ox).min(end - j);
        im2col_run(x, g, tap, (oy, ox), &mut out[j - j0..j - j0 + run]);
        j += run;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::ConvConfig;

    /// A 3x3 conv's geometry, stride 1, padding 1.
    fn geo3x3((b, c, h, w): (usize, usize, usize, usize), o: usize) -> Geo {
        let cfg = ConvConfig {
            stride: 1,
            padding: 1,
        };
        Geo::new(&[b, c, h, w], &[o, c, 3, 3], cfg).unwrap()
    }

    /// `n` numbers along a sine (`cos`: a cosine) of step `step`.
    fn wave(n: usize, step: f32, cos: bool) -> Vec<f32> {
        let f = |i: usize| i as f32 * step;
        (0..n)
            .map(|i| if cos { f(i).cos() } else { f(i).sin() })
            .collect()
    }

    /// Chunks of pixels (the last one short, one panel the smallest) give the bits one chunk
    /// gives: each output's sum runs over the same `k` in the same order.
    #[test]
    fn chunks_give_the_bits_of_one_chunk() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (c, h, w, o) = (20, 11, 15, 40);
        let g = geo3x3((2, c, h, w), o);
        let (x, wt) = (
            wave(2 * c * h * w, 0.37, false),
            wave(o * c * 9, 0.11, true),
        );
        let run = |budget: usize| {
            let mut y = vec![0.5f32; 2 * o * g.npix()];
            forward_in_chunks((&x, Data::Plain(&wt)), &mut y, 2, &g, (budget, true));
            y
        };
        let whole = run(usize::MAX / 4);
        for pixels in [32, 64, 96] {
            assert_eq!(run(2 * g.k() * pixels), whole, "chunks of {pixels} pixels");
        }
        // and the budget does cut chunks: too small a budget still makes one-panel chunks
        assert_eq!(run(1), whole);
        assert!(whole.iter().all(|v| v.is_finite()) && whole.iter().any(|&v| v != 0.5));
    }

    /// Groups of channels (the last one short) hand out the bits one group does, channel by
    /// channel in order.
    #[test]
    fn channel_groups_give_the_bits_of_one_group() {
        if !bf16::supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (c, h, w, o) = (14, 9, 10, 300);
        let g = geo3x3((1, c, h, w), o);
        let (dy, wt) = (wave(o * g.npix(), 0.37, false), wave(o * c * 9, 0.11, true));
        let run = |budget: usize| {
            let each = |ch: usize, rows: &[f32]| (ch, rows.to_vec());
            column_grads_in_groups((Data::Plain(&wt), &dy[..]), &g, each, (budget, None))
        };
        let whole = run(usize::MAX / 4).unwrap();
        assert_eq!(whole.len(), c);
        assert!(whole
            .iter()
            .enumerate()
            .all(|(i, (ch, rows))| *ch == i && rows.len() == 9 * g.npix()));
        // 4 channels (36 rows: three panels) a group, and 8
        for channels in [4, 8] {
            let grouped = run(channels * 9 * g.npix() * 4).unwrap();
            assert_eq!(grouped, whole, "groups of {channels} channels");
        }
    }
}
