//! The AMX kernel: blocks of `MR` rows of a tiled left operand (one or two panels) against a
//! right operand's panel of `NR` columns, a group of [`GROUP`] pairs at a time, the result in
//! tiles until the block's last group.

use super::super::kernel::Out;
use super::super::pack::Block;
use super::super::{MR, NR};
use super::unit::TileUnit;
use super::GROUP;

/// The kernel on a tile unit `U`, with the room its blocks need.
pub(super) struct Tiles<U> {
    unit: U,
    /// The right panel's last group where the block's pairs end within one, zero past them.
    tail: [u32; GROUP * NR],
    /// A block of the result, `MR x NR`, as the tiles store it (where it is not stored in place).
    c: [f32; MR * NR],
}

impl<U: TileUnit> Tiles<U> {
    /// The kernel on `unit`.
    pub(super) fn new(unit: U) -> Self {
        Tiles {
            unit,
            tail: [0; GROUP * NR],
            c: [0.0; MR * NR],
        }
    }

    /// `out(i) (+)= scale * a_i b` for the panels `i` in `panels` of `a` (tiled), over the
    /// pairs `pairs` of the block (`pairs.0` starting a group), `b` the right operand's panel
    /// over those pairs (`NR` words each); `out(i)` where panel `i`'s block of the result goes.
    ///
    /// # Safety
    /// Each `out(i)` is valid for its block's writes (and reads, where it accumulates).
    pub(super) unsafe fn rows(
        &mut self,
        a: &Block<'_>,
        (i0, i1): (usize, usize),
        (q0, q1): (usize, usize),
        b: &[u32],
        out: impl Fn(usize) -> Out,
    ) {
        let Tiles { unit, tail, c } = self;
        let pairs = q1 - q0;
        assert!(a.of.tiled && b.len() == pairs * NR);
        let (whole, rest) = (pairs / GROUP, pairs % GROUP);
        if rest > 0 {
            tail[..rest * NR].copy_from_slice(&b[whole * GROUP * NR..]);
            tail[rest * NR..].fill(0);
        }
        let tail = &tail[..];
        let group = |g: usize| match g < whole {
            true => &b[g * GROUP * NR..(g + 1) * GROUP * NR],
            false => tail,
        };
        let groups = pairs.div_ceil(GROUP);
        let mut i = i0;
        while i < i1 {
            let a0 = a.panel(i, (q0, q1));
            // SAFETY (both): the caller's promise for `out`.
            if i + 1 < i1 {
                let a1 = a.panel(i + 1, (q0, q1));
                unsafe { kernel(unit, [a0, a1], (group, groups), [out(i), out(i + 1)], c) };
                i += 2;
            } else {
                unsafe { kernel(unit, [a0], (group, groups), [out(i)], c) };
                i += 1;
            }
        }
    }
}

/// `out[r] (+)= scale * a[r] b` for `R` panels `a` (1 or 2; `groups` groups of pairs each)
/// against the right panel's groups (`group(g)`): tiles `0, 1` (`2, 3`) hold panel 0's (1's)
/// block in two halves of `NR / 2` columns, `4` (`5`) its group of pairs, `6, 7` the right
/// panel's group's halves. A whole block at scale 1 starts from the result (or zero) and is
/// stored to it; others pass through `c` ([`epilogue`]).
///
/// # Safety
/// Each `out[r]` is valid for its block's reads and writes.
unsafe fn kernel<'b, U: TileUnit, const R: usize>(
    unit: &mut U,
    a: [&[u32]; R],
    (group, groups): (impl Fn(usize) -> &'b [u32], usize),
    out: [Out; R],
    c: &mut [f32],
) {
    const A: usize = GROUP * MR;
    // SAFETY (begin, finish): the caller's promise.
    unsafe { begin::<U, 0, 1>(unit, &out[0]) };
    if R == 2 {
        unsafe { begin::<U, 2, 3>(unit, &out[1]) };
    }
    for g in 0..groups {
        let b = group(g);
        unit.load::<6>(b, NR);
        unit.load::<7>(&b[NR / 2..], NR);
        unit.load::<4>(&a[0][g * A..], GROUP);
        unit.dot::<0, 4, 6>();
        unit.dot::<1, 4, 7>();
        if R == 2 {
            unit.load::<5>(&a[1][g * A..], GROUP);
            unit.dot::<2, 5, 6>();
            unit.dot::<3, 5, 7>();
        }
    }
    unsafe { finish::<U, 0, 1>(unit, &out[0], c) };
    if R == 2 {
        unsafe { finish::<U, 2, 3>(unit, &out[1], c) };
    }
}

/// Whether a block goes to and from its place in the result through the tiles: whole, and at
/// scale 1 (all but attention's scores).
fn in_place(out: &Out) -> bool {
    out.block == (MR, NR) && out.scale == 1.0
}

/// Tiles `T0, T1` (a block's halves) start from the block's numbers where it adds to them in
/// place, else from zero.
///
/// # Safety
/// `out` is valid for its block's reads.
unsafe fn begin<U: TileUnit, const T0: u8, const T1: u8>(unit: &mut U, out: &Out) {
    if in_place(out) && out.accumulate {
        // SAFETY: a whole block: `MR` rows of `NR` numbers, `rs` apart.
        unsafe {
            unit.load_from::<T0>(out.c.cast(), out.rs);
            unit.load_from::<T1>(out.c.add(NR / 2).cast(), out.rs);
        }
    } else {
        unit.zero::<T0>();
        unit.zero::<T1>();
    }
}

/// Tiles `T0, T1` (a block's halves) into the block: stored in place, or into `c` and added
/// from there ([`epilogue`]).
///
/// # Safety
/// `out` is valid for its block's reads and writes.
unsafe fn finish<U: TileUnit, const T0: u8, const T1: u8>(unit: &mut U, out: &Out, c: &mut [f32]) {
    // SAFETY (both): a whole block in place; else the caller's promise.
    if in_place(out) {
        unsafe {
            unit.store_to::<T0>(out.c, out.rs);
            unit.store_to::<T1>(out.c.add(NR / 2), out.rs);
        }
    } else {
        unit.store::<T0>(c, NR);
        unit.store::<T1>(&mut c[NR / 2..], NR);
        unsafe { epilogue(c, *out) };
    }
}

/// A block of the result (`MR x NR`, rows `NR` apart) out: `out.c (+)= out.scale * c` for its
/// first `rows x cols`.
///
/// # Safety
/// `out` is valid for its block's reads and writes.
unsafe fn epilogue(c: &[f32], out: Out) {
    let (rows, cols) = out.block;
    for (r, line) in c.chunks_exact(NR).enumerate().take(rows) {
        // SAFETY: the caller's promise: `rows` rows of `cols` numbers, `rs` apart.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.c.add(r * out.rs), cols) };
        for (d, &x) in dst.iter_mut().zip(line) {
            *d = if out.accumulate {
                *d + out.scale * x
            } else {
                out.scale * x
            };
        }
    }
}
