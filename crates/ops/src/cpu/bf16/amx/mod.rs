//! The bf16 products on AMX tiles (Sapphire Rapids and later Xeons): `tdpbf16ps` multiplies a
//! tile of 12 rows by 16 pairs of `k` into a tile of 12 x 16 f32 sums in one instruction, where
//! `vdpbf16ps` does 16 columns by one pair.
//!
//! The right operand's panels are already what `tdpbf16ps` reads for its second tile (a pair
//! of `k` per column, 16 columns in 64 bytes: a panel of `NR` columns is two tiles). The
//! left operand's panels are regrouped (`Panels::tiled`): each group of
//! `GROUP` pairs holds its `MR` rows one after the other, a tile's 768 bytes in a run. The
//! kernel (`kernel`) keeps two panels' blocks of the result in four tiles, so each group
//! costs four loads for four products. Left operands whose rows are runs in memory
//! (activations, weights) pack straight into tiles at the pair panels' cost; others (a
//! transposed weight, Winograd's filters) are packed, then regrouped. Attention's
//! probabilities and their gradients' transposes stay in pair panels on AVX512-BF16: they
//! multiply a head's width of values, too little to repay the regrouping.
//!
//! **Not yet run on a CPU with AMX**: the machine it was written on has none. The kernel's
//! addressing, blocking and sums are tested against an emulation of the tile unit that
//! follows Intel's reference (`unit::Emulated`); the instructions themselves wait for such a
//! machine. So the path is opt-in (`ATOMTUNE_CPU_AMX=1`, with bf16 products on), and
//! where it is asked for, it first checks a product against exact sums on this CPU
//! ([`active`]) and stays off, with a warning, where it disagrees. [`set_emulated`] runs the
//! whole path on the emulation, for tests of every op's tiled products on any CPU.

mod kernel;
mod unit;

use super::super::matmul::{Dst, Mat};
use super::{product::gemm_packed, Panels};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Pairs of `k` a tile of the left operand holds (64 bytes a row): a tiled left operand's
/// panels come in groups of this many, and a product's blocks of `k` start at a group.
pub(crate) const GROUP: usize = 16;

/// The environment variable that asks for the AMX tiles (`1`) when the bf16 products are on.
pub const VAR: &str = "ATOMTUNE_CPU_AMX";

/// The switch: on by [`set_enabled`], else by `ATOMTUNE_CPU_AMX=1`; off by default (see the
/// module's note).
static SWITCH: super::super::switch::Switch =
    super::super::switch::Switch::new(VAR, false, "AMX tile products");

/// Asks for (or declines) the AMX tiles for the whole process; they run where [`active`] holds.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether the AMX tiles are asked for: by [`set_enabled`], else by `ATOMTUNE_CPU_AMX=1`.
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Whether tiled products run on the emulated tile unit ([`set_emulated`]).
static EMULATED: AtomicBool = AtomicBool::new(false);

/// Tiles left operands and runs their products on an emulation of the tile unit, on any CPU
/// with AVX512-BF16: for tests of the tiled path (packing, blocking, the kernel's addressing)
/// where no CPU with AMX is at hand. Exact as the instructions' reference is, and a few hundred
/// times slower than the CPU's kernels. For the whole process; no effect while bf16 products
/// are off.
pub fn set_emulated(on: bool) {
    EMULATED.store(on, Ordering::Relaxed);
}

/// Whether this CPU has AMX-TILE and AMX-BF16 (and AVX512-BF16, which the rest of the bf16
/// path uses) and the operating system lets this process use the tile state: on Linux, asked
/// once with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| has_instructions() && super::supported() && permitted())
}

/// CPUID leaf 7's AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24).
#[cfg(target_arch = "x86_64")]
fn has_instructions() -> bool {
    use std::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: every x86_64 CPU has CPUID; leaf 7 is asked only where the CPU lists it.
    unsafe {
        __cpuid_count(0, 0).eax >= 7 && {
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn has_instructions() -> bool {
    false
}

/// Asks Linux for the tile data state (a process must, before its first tile instruction),
/// and reads back that it was given.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn permitted() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes reads a number and writes one u64 to `mask`.
    unsafe {
        if libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) != 0
        {
            let err = std::io::Error::last_os_error();
            eprintln!(
                "warning: Linux refused this process the AMX tile state ({err}); the bf16 \
                 products run on AVX512-BF16"
            );
            return false;
        }
        let mut mask = 0u64;
        let got = libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        );
        got == 0 && mask & (1 << XFEATURE_XTILEDATA) != 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn permitted() -> bool {
    false
}

/// Whether the bf16 products run on AMX tiles now: bf16 products on ([`super::active`]), and
/// either the emulation asked for ([`set_emulated`]) or the tiles asked for ([`enabled`]) and
/// [`available`], with a first product on them equal to its exact sums (checked once, with a
/// warning where it fails). Left operands packed while it holds are tiled; a product runs on
/// the tiles where its left operand is.
pub fn active() -> bool {
    #[cfg(test)]
    if FORCE.with(std::cell::Cell::get) {
        return true;
    }
    super::active() && (EMULATED.load(Ordering::Relaxed) || enabled() && usable())
}

/// Whether the CPU's tiles, asked for, can run the products: [`available`] and [`trusted`]. A
/// CPU without the instructions says so once (a refusal by Linux says so itself).
fn usable() -> bool {
    static NONE: std::sync::Once = std::sync::Once::new();
    if !has_instructions() {
        NONE.call_once(|| {
            eprintln!(
                "warning: {VAR}=1, but this CPU has no AMX-BF16 tiles; the bf16 products run on \
                 AVX512-BF16"
            )
        });
        return false;
    }
    available() && trusted()
}

/// Whether the first product on this CPU's tiles agreed with its exact sums ([`agrees`]),
/// checked once; a warning where it did not.
fn trusted() -> bool {
    static AGREES: OnceLock<bool> = OnceLock::new();
    *AGREES.get_or_init(|| {
        let ok = agrees();
        if !ok {
            eprintln!(
                "warning: a product on this CPU's AMX tiles disagreed with its exact sums; the \
                 bf16 products run on AVX512-BF16 (please report this CPU: `lscpu`)"
            );
        }
        ok
    })
}

/// The tile unit for products with a tiled left operand, configured on this thread while it
/// lives: the CPU's, or the emulation where asked for ([`set_emulated`]; or in this crate's tests
/// on a CPU without AMX).
pub(super) struct Tiles(Unit);

/// Whose tiles [`Tiles`] runs on. A value on the stack for one product: the CPU's 3.5 KB in
/// place (boxing it would allocate per product), the emulation's 11.5 KB boxed.
#[allow(clippy::large_enum_variant)]
enum Unit {
    /// The CPU's.
    Cpu(kernel::Tiles<unit::Amx>),
    /// The emulation's.
    Emulated(Box<kernel::Tiles<unit::Emulated>>),
}

impl Tiles {
    /// The tiles, configured.
    pub(super) fn new() -> Tiles {
        RUNS.fetch_add(1, Ordering::Relaxed);
        if EMULATED.load(Ordering::Relaxed) || cfg!(test) && !available() {
            return Tiles(Unit::Emulated(Box::new(kernel::Tiles::new(
                unit::Emulated::default(),
            ))));
        }
        assert!(available(), "tiled panels on a CPU without AMX");
        // SAFETY: `available` says the CPU has the instructions and Linux gave the tile state.
        Tiles(Unit::Cpu(kernel::Tiles::new(unsafe { unit::Amx::new() })))
    }

    /// `out(i) (+)= scale * a_i b` for the tiled left operand's panels `i` in `panels`, over
    /// the block's pairs `pairs`, `b` a right operand's panel over those pairs: see
    /// `kernel::Tiles::rows`.
    ///
    /// # Safety
    /// Each `out(i)` is valid for its block's writes (and reads, where it accumulates).
    pub(super) unsafe fn rows(
        &mut self,
        a: &super::Block<'_>,
        (panels, pairs): ((usize, usize), (usize, usize)),
        b: &[u32],
        out: impl Fn(usize) -> super::kernel::Out,
    ) {
        // SAFETY (both): the caller's promise.
        match &mut self.0 {
            Unit::Cpu(t) => unsafe { t.rows(a, panels, pairs, b, out) },
            Unit::Emulated(t) => unsafe { t.rows(a, panels, pairs, b, out) },
        }
    }
}

/// Products run on tiles so far (calls of `multiply` with a tiled left operand: [`Tiles::new`]).
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many products (calls of `multiply`, each a block of a larger product) this process has
/// run on tiles, the CPU's or the emulation's: for tests and diagnostics that a run took the
/// path.
pub fn tiled_runs() -> usize {
    RUNS.load(Ordering::Relaxed)
}

/// A product of a tiled left operand whose sums are exact in f32 (multiples of 1/256 below
/// 2^11), on this thread, equal to those sums: `25 x 90` (three panels: a pair and a single; 45
/// pairs: two groups and a tail) by `90 x 40` (a whole panel and a part).
fn agrees() -> bool {
    let (m, k, n) = (25, 90, 40);
    let a: Vec<f32> = (0..m * k)
        .map(|i| (i * 37 % 101) as f32 / 16.0 - 3.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| (i * 53 % 89) as f32 / 16.0 - 2.5)
        .collect();
    let pa = Panels::left_pairs(&Mat::new(&a[..], m, k), Vec::new()).tiled();
    let pb = Panels::right(&Mat::new(&b[..], k, n), Vec::new());
    let mut c = vec![f32::NAN; m * n];
    let dst = Dst {
        ptr: c.as_mut_ptr(),
        rs: 0,
    };
    // SAFETY: callers hold `available` (hence AVX512-BF16); `c` is `m x n`.
    unsafe { gemm_packed(1, dst, &pa, &pb, 1.0, false) };
    (0..m * n).all(|ij| {
        let (i, j) = (ij / n, ij % n);
        let exact: f64 = (0..k)
            .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
            .sum();
        c[ij] as f64 == exact
    })
}

#[cfg(test)]
std::thread_local! {
    /// Tests: left operands packed on this thread are tiled, whatever [`active`] would say.
    static FORCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's left operands tiled (on the CPU's tiles where it has them, else
/// on the emulation).
#[cfg(test)]
pub(crate) fn forced<R>(f: impl FnOnce() -> R) -> R {
    FORCE.with(|x| x.set(true));
    let r = f();
    FORCE.with(|x| x.set(false));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check a process makes before it trusts the tiles passes on the tiles (emulated where
    /// the CPU has none), so a failure means the CPU disagrees.
    #[test]
    fn the_first_product_agrees_with_its_exact_sums() {
        if !available() {
            eprintln!("note: this CPU has no AMX: the check runs on the emulation");
        }
        assert!(agrees());
    }
}
