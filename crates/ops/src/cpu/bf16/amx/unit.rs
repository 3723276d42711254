//! The tile unit the AMX kernel drives: the CPU's ([`Amx`], `asm!` of the AMX-TILE and
//! AMX-BF16 instructions) or, for tests on CPUs without it, an emulation that follows Intel's
//! description of the instructions ([`Emulated`]). Both take the same shapes ([`SHAPES`]); loads
//! and stores of operands are checked against the slice they are given (only a whole block of
//! the result goes through a pointer), so the kernel's addressing is tested wherever the tests
//! run.

use super::super::{MR, NR};
use super::GROUP;

/// Each tile's `(rows, bytes a row)` as the kernel configures them: `0..4` the result's blocks
/// (`MR` rows of 16 f32), `4..6` the left operand's (`MR` rows of [`GROUP`] pair words), `6..8`
/// the right operand's (`GROUP` pairs of 16 columns' words).
pub(super) const SHAPES: [(usize, usize); 8] = [
    (MR, 64),
    (MR, 64),
    (MR, 64),
    (MR, 64),
    (MR, 4 * GROUP),
    (MR, 4 * GROUP),
    (GROUP, 64),
    (GROUP, 64),
];

/// Words a tile `t` spans in a slice whose rows are `stride` words apart.
fn span(t: u8, stride: usize) -> usize {
    let (rows, bytes) = SHAPES[t as usize];
    assert!(
        stride >= bytes / 4,
        "tile {t}: rows {stride} words apart overlap"
    );
    (rows - 1) * stride + bytes / 4
}

/// The operations of the tile unit the kernel uses, on tiles named by number (`tmm0..tmm7`),
/// shaped as [`SHAPES`] says. Loads and stores check their slice's length.
pub(super) trait TileUnit {
    /// Tile `T` all zeros.
    fn zero<const T: u8>(&mut self);
    /// Tile `T` from `src`, its rows `stride` words apart (`tileloadd`).
    fn load<const T: u8>(&mut self, src: &[u32], stride: usize) {
        assert!(src.len() >= span(T, stride));
        // SAFETY: the tile's rows lie within `src` (checked above).
        unsafe { self.load_from::<T>(src.as_ptr(), stride) }
    }
    /// `C += A B` over pairs (`tdpbf16ps`): row `m`, column `n` of `C` gains, for each pair `k`,
    /// `A[m][k].lo * B[k][n].lo + A[m][k].hi * B[k][n].hi` in f32.
    fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    /// Tile `T` into `dst`, its rows `stride` numbers apart (`tilestored`).
    fn store<const T: u8>(&mut self, dst: &mut [f32], stride: usize) {
        assert!(dst.len() >= span(T, stride));
        // SAFETY: the tile's rows lie within `dst` (checked above).
        unsafe { self.store_to::<T>(dst.as_mut_ptr(), stride) }
    }
    /// [`TileUnit::load`] from a pointer to 32-bit words (pair words, or a result's f32 bits).
    ///
    /// # Safety
    /// `src` is valid for reads of the tile's rows.
    unsafe fn load_from<const T: u8>(&mut self, src: *const u32, stride: usize);
    /// [`TileUnit::store`] to a pointer.
    ///
    /// # Safety
    /// `dst` is valid for writes of the tile's rows, which no one else reads or writes meanwhile.
    unsafe fn store_to<const T: u8>(&mut self, dst: *mut f32, stride: usize);
}

/// The CPU's tile unit, configured for [`SHAPES`] on this thread while it lives (tile state is a
/// thread's own: not `Send`); released when dropped.
pub(super) struct Amx(std::marker::PhantomData<*const ()>);

/// The 64 bytes `ldtilecfg` reads: palette 1, then each tile's bytes a row (16-bit, from byte
/// 16) and rows (from byte 48).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, &(rows, bytes)) in SHAPES.iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + t] = rows as u8;
        }
        Config(c)
    }
}

impl Amx {
    /// The tile unit, configured.
    ///
    /// # Safety
    /// The CPU has AMX-TILE and AMX-BF16 and the kernel has let this process use the tile state
    /// ([`super::available`]).
    pub(super) unsafe fn new() -> Amx {
        let config = Config::new();
        // SAFETY: the caller's promise; a valid palette-1 configuration.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let bytes = config.0.as_ptr();
            std::arch::asm!("ldtilecfg [{}]", in(reg) bytes, options(nostack, readonly));
        }
        let _ = config;
        Amx(std::marker::PhantomData)
    }
}

impl Drop for Amx {
    fn drop(&mut self) {
        // SAFETY: configured in `new`; releasing returns the tiles to their initial state.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl TileUnit for Amx {
    #[inline(always)]
    fn zero<const T: u8>(&mut self) {
        use std::arch::asm;
        // SAFETY (all): configured (`new`); register-only instructions.
        unsafe {
            match T {
                0 => asm!("tilezero tmm0", options(nostack, nomem)),
                1 => asm!("tilezero tmm1", options(nostack, nomem)),
                2 => asm!("tilezero tmm2", options(nostack, nomem)),
                3 => asm!("tilezero tmm3", options(nostack, nomem)),
                t => unreachable!("the kernel zeroes no tile {t}"),
            }
        }
    }

    #[inline(always)]
    fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        use std::arch::asm;
        // SAFETY (all): configured with shapes that agree (C's rows A's, C's row bytes B's,
        // A's pairs B's rows); register-only instructions.
        unsafe {
            match (C, A, B) {
                (0, 4, 6) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
                (1, 4, 7) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
                (2, 5, 6) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
                (3, 5, 7) => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
                t => unreachable!("the kernel multiplies no tiles {t:?}"),
            }
        }
    }

    #[inline(always)]
    unsafe fn load_from<const T: u8>(&mut self, src: *const u32, stride: usize) {
        let (p, s) = (src, stride * 4);
        macro_rules! load {
            ($tile:literal) => {
                std::arch::asm!(
                    concat!("tileloadd ", $tile, ", [{p} + {s}*1]"),
                    p = in(reg) p,
                    s = in(reg) s,
                    options(nostack, readonly)
                )
            };
        }
        // SAFETY (all): configured; the caller's promise for `src`.
        unsafe {
            match T {
                0 => load!("tmm0"),
                1 => load!("tmm1"),
                2 => load!("tmm2"),
                3 => load!("tmm3"),
                4 => load!("tmm4"),
                5 => load!("tmm5"),
                6 => load!("tmm6"),
                7 => load!("tmm7"),
                t => unreachable!("no tile {t}"),
            }
        }
    }

    #[inline(always)]
    unsafe fn store_to<const T: u8>(&mut self, dst: *mut f32, stride: usize) {
        let (p, s) = (dst, stride * 4);
        macro_rules! store {
            ($tile:literal) => {
                std::arch::asm!(
                    concat!("tilestored [{p} + {s}*1], ", $tile),
                    p = in(reg) p,
                    s = in(reg) s,
                    options(nostack)
                )
            };
        }
        // SAFETY (all): configured; the caller's promise for `dst`.
        unsafe {
            match T {
                0 => store!("tmm0"),
                1 => store!("tmm1"),
                2 => store!("tmm2"),
                3 => store!("tmm3"),
                t => unreachable!("the kernel stores no tile {t}"),
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl TileUnit for Amx {
    fn zero<const T: u8>(&mut self) {
        unreachable!("no AMX off x86_64")
    }
    fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        unreachable!("no AMX off x86_64")
    }
    unsafe fn load_from<const T: u8>(&mut self, _: *const u32, _: usize) {
        unreachable!("no AMX off x86_64")
    }
    unsafe fn store_to<const T: u8>(&mut self, _: *mut f32, _: usize) {
        unreachable!("no AMX off x86_64")
    }
}

/// The tile unit in software, as Intel's instruction set reference describes it: eight tiles
/// of 16 rows of 64 bytes, a load zeroing what lies past its shape, and `tdpbf16ps`'s sums one
/// pair at a time, low half first, bf16 inputs' denormals read as zero and denormal results
/// flushed to zero. Shapes that the CPU would refuse (`#UD`) panic.
#[derive(Default)]
pub(super) struct Emulated {
    tiles: [[[u32; 16]; 16]; 8],
}

/// A bf16 half of a pair word as f32, a denormal as zero (the instruction's DAZ).
fn half(word: u32, high: bool) -> f32 {
    let x = f32::from_bits(if high { word & 0xffff_0000 } else { word << 16 });
    if x.is_subnormal() {
        0.0
    } else {
        x
    }
}

impl TileUnit for Emulated {
    fn zero<const T: u8>(&mut self) {
        self.tiles[T as usize] = [[0; 16]; 16];
    }

    fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (c, a, b) = (SHAPES[C as usize], SHAPES[A as usize], SHAPES[B as usize]);
        assert!(C != A && C != B && A != B, "tdpbf16ps names three tiles");
        assert!(
            c.0 == a.0 && c.1 == b.1 && a.1 / 4 == b.0,
            "shapes {c:?} {a:?} {b:?}"
        );
        let (ta, tb) = (self.tiles[A as usize], self.tiles[B as usize]);
        let tc = &mut self.tiles[C as usize];
        for (m, row) in tc.iter_mut().enumerate().take(c.0) {
            for (n, out) in row.iter_mut().enumerate().take(c.1 / 4) {
                let mut acc = f32::from_bits(*out);
                for k in 0..a.1 / 4 {
                    for high in [false, true] {
                        // a product of two bf16 numbers is exact in f32: a fused
                        // multiply-add's one rounding
                        acc += half(ta[m][k], high) * half(tb[k][n], high);
                        if acc.is_subnormal() {
                            acc = 0.0f32.copysign(acc);
                        }
                    }
                }
                *out = acc.to_bits();
            }
        }
    }

    unsafe fn load_from<const T: u8>(&mut self, src: *const u32, stride: usize) {
        let (rows, bytes) = SHAPES[T as usize];
        let tile = &mut self.tiles[T as usize];
        *tile = [[0; 16]; 16];
        for (r, row) in tile.iter_mut().enumerate().take(rows) {
            // SAFETY: the caller's promise.
            let src = unsafe { std::slice::from_raw_parts(src.add(r * stride), bytes / 4) };
            row[..bytes / 4].copy_from_slice(src);
        }
    }

    unsafe fn store_to<const T: u8>(&mut self, dst: *mut f32, stride: usize) {
        let (rows, bytes) = SHAPES[T as usize];
        for (r, row) in self.tiles[T as usize].iter().enumerate().take(rows) {
            // SAFETY: the caller's promise.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.add(r * stride), bytes / 4) };
            for (o, &w) in dst.iter_mut().zip(row) {
                *o = f32::from_bits(w);
            }
        }
    }
}

/// Keeps `NR` in the unit's vocabulary: the right operand's panel is two tiles wide.
const _: () = assert!(NR == 32 && 4 * GROUP == 64 && MR <= 16);

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulation sums pairs as the manual's pseudo-code does: `C[m][n] += sum over pairs k
    /// of A[m][k].lo B[k][n].lo + A[m][k].hi B[k][n].hi`, against a sum in f64 of small whole
    /// numbers (exact in f32), and zeroes what a load's shape leaves out.
    #[test]
    fn emulated_dot_sums_pairs_of_rows_and_columns() {
        let bf = |x: f32| x.to_bits() >> 16;
        let word = |lo: f32, hi: f32| bf(hi) << 16 | bf(lo);
        let a: Vec<u32> = (0..MR * GROUP)
            .map(|i| word((i % 7) as f32 - 3.0, (i % 5) as f32))
            .collect();
        let b: Vec<u32> = (0..GROUP * 32)
            .map(|i| word((i % 3) as f32, 2.0 - (i % 11) as f32))
            .collect();
        let mut u = Emulated::default();
        u.zero::<0>();
        u.zero::<1>();
        u.load::<4>(&a, GROUP);
        u.load::<6>(&b, 32);
        u.load::<7>(&b[16..], 32);
        u.dot::<0, 4, 6>();
        u.dot::<1, 4, 7>();
        u.dot::<1, 4, 7>();
        let mut c = vec![f32::NAN; MR * 32];
        u.store::<0>(&mut c, 32);
        u.store::<1>(&mut c[16..], 32);
        let lo_hi = |w: u32| (half(w, false) as f64, half(w, true) as f64);
        for m in 0..MR {
            for n in 0..32 {
                let want: f64 = (0..GROUP)
                    .map(|k| {
                        let ((al, ah), (bl, bh)) = (lo_hi(a[m * GROUP + k]), lo_hi(b[k * 32 + n]));
                        al * bl + ah * bh
                    })
                    .sum::<f64>()
                    * if n < 16 { 1.0 } else { 2.0 };
                assert_eq!(c[m * 32 + n] as f64, want, "({m}, {n})");
            }
        }
    }

    /// Shapes the CPU refuses panic in the emulation: a result tile multiplied into itself.
    #[test]
    #[should_panic(expected = "three tiles")]
    fn emulated_dot_refuses_what_the_cpu_refuses() {
        Emulated::default().dot::<4, 4, 6>();
    }

    /// A load past its slice panics before it reads.
    #[test]
    #[should_panic(expected = "src.len() >= span(T, stride)")]
    fn loads_past_the_slice_panic() {
        Emulated::default().load::<6>(&[0u32; 16 * 32 - 17], 32);
    }

    /// The configuration's bytes: palette 1, each tile's row bytes and rows where `ldtilecfg`
    /// reads them.
    #[test]
    fn the_configuration_names_each_tiles_shape() {
        let c = Config::new().0;
        assert_eq!(c[0], 1);
        assert!(c[1..16].iter().all(|&b| b == 0));
        assert_eq!(&c[16..20], &[64, 0, 64, 0]);
        assert_eq!(&c[48..56], &[12, 12, 12, 12, 12, 12, 16, 16]);
        assert!(c[32..48].iter().chain(&c[56..]).all(|&b| b == 0));
    }
}
