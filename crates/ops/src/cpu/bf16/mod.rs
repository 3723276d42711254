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
//! Layout: `b [k, n]` is packed in panels of `NR` columns, each `[k/2][NR][2]` (a pair of
//! consecutive `k` per column, as `vdpbf16ps` reads them); `a [m, k]` in panels of `MR` rows,
//! `[k/2][MR]` pairs. A micro-kernel keeps an `MR x NR` block of the result in 24 registers and
//! walks `k` two at a time; the result is written once per block of `k` (at most `product::KC`).
//! Only products large enough to repay the packing take this path (`worth_it`: `k >= 256`,
//! `m, n >= 64`).
//!
//! Its parts: `round` (f32 to bf16 as the CPU rounds), `pack` (operands into panels of pair
//! words), `kernel` (the micro-kernels), `product` (blocks for the caches, tasks for the
//! threads), `exp_cols` (attention's probabilities made and packed in one pass), [`amx`] (the
//! same products on AMX tiles, opt-in: left operands regrouped into tiles, `tdpbf16ps`).

pub mod amx;
mod exp_cols;
mod kernel;
mod pack;
#[cfg(test)]
mod peak;
mod product;
mod round;

use amx::GROUP;
pub(crate) use exp_cols::pack_exp_cols;
pub(crate) use pack::{Block, Panels, Scratch};
pub(crate) use product::{gemm, gemm_right_from, gemm_with_packed, multiply, CHUNK_BYTES};
#[cfg(test)]
pub(crate) use round::round;
pub(crate) use round::{first_lanes, pair_run};
#[cfg(target_arch = "x86_64")]
pub(crate) use round::{pair16, round16};

/// Rows of the micro-kernel's block.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's block (two vectors of 16 f32).
pub(crate) const NR: usize = 32;

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

/// Test operands: `n` numbers of a wave of step `s` around 0.25, signs and sizes mixed.
#[cfg(test)]
fn wave(n: usize, s: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * s).sin() * 3.0) + 0.25)
        .collect()
}
