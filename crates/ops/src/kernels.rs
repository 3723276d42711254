//! Which implementation of each op runs: the fused CPU kernels or the portable code every
//! device runs.
//!
//! The choice is made per call: a GPU (or a dtype the fused kernels lack) always takes the
//! portable path; on the CPU, [`Kernels::current`] decides. Its default comes from the
//! environment ([`KERNELS_VAR`], read once), and a thread can override it for a closure
//! ([`Kernels::scope`]), so one test can run both paths side by side.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::Result;

/// The environment variable that picks the CPU's kernels: `fused` (the default) or `portable`.
pub const KERNELS_VAR: &str = "ATOMTUNE_KERNELS";

/// The implementation the CPU runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// The fused CPU kernels (f32 and f64; other dtypes take the portable path).
    #[default]
    Fused,
    /// The code a GPU runs: every op from candle tensor ops, memory-bounded.
    Portable,
}

thread_local! {
    static OVERRIDE: Cell<Option<Kernels>> = const { Cell::new(None) };
}

impl Kernels {
    /// Every choice, in the order help texts list them.
    pub const ALL: [Kernels; 2] = [Kernels::Fused, Kernels::Portable];

    /// The name `ATOMTUNE_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Fused => "fused",
            Kernels::Portable => "portable",
        }
    }

    /// The choice `ATOMTUNE_KERNELS` makes (unset or empty: [`Kernels::Fused`]), or an error
    /// that names the variable, its value and the valid ones. Read once per process.
    pub fn from_env() -> Result<Kernels> {
        static FROM_ENV: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
        FROM_ENV
            .get_or_init(|| match std::env::var(KERNELS_VAR) {
                Ok(v) if !v.is_empty() => v.parse().map_err(|e: UnknownKernels| e.to_string()),
                _ => Ok(Kernels::Fused),
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// The choice in force on this thread: a [`Kernels::scope`] around the caller, else the
    /// environment's.
    pub fn current() -> Result<Kernels> {
        match OVERRIDE.with(Cell::get) {
            Some(k) => Ok(k),
            None => Kernels::from_env(),
        }
    }

    /// The override in force on this thread, if any (for code that moves work to another
    /// thread and wants the choice to go along: [`crate::on_compute_thread`]).
    pub fn overridden() -> Option<Kernels> {
        OVERRIDE.with(Cell::get)
    }

    /// Runs `f` with `self` in force on this thread (ops `f` calls here, and the backward passes
    /// it runs here), then restores what was in force before.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        Kernels::scope_opt(Some(self), f)
    }

    /// [`Kernels::scope`] with an optional choice (`None`: the environment's).
    pub(crate) fn scope_opt<R>(k: Option<Kernels>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Kernels>);
        impl Drop for Restore {
            fn drop(&mut self) {
                OVERRIDE.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(OVERRIDE.with(|c| c.replace(k)));
        f()
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A value of `ATOMTUNE_KERNELS` that names no implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKernels(String);

impl fmt::Display for UnknownKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Kernels::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "{KERNELS_VAR}={:?} is not a kernel choice (expected one of: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownKernels {}

impl FromStr for Kernels {
    type Err = UnknownKernels;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownKernels> {
        Kernels::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownKernels(s.to_string()))
    }
}

/// Whether an op over `inputs` runs its fused CPU kernel: they are on the CPU, in one dtype that
/// is f32 or f64, and [`Kernels::current`] is [`Kernels::Fused`].
pub(crate) fn fused(inputs: &[&Tensor]) -> Result<bool> {
    let Some(first) = inputs.first() else {
        return Ok(false);
    };
    let fits = first.device().is_cpu()
        && matches!(first.dtype(), DType::F32 | DType::F64)
        && inputs.iter().all(|t| t.dtype() == first.dtype());
    Ok(fits && Kernels::current()? == Kernels::Fused)
}

/// Whether `w` is a bf16 weight beside f32 input `x`: the CPU's mixed precision keeps frozen
/// weights in bf16 (half the memory) and computes in f32.
pub(crate) fn is_bf16_weight(x: &Tensor, w: &Tensor) -> bool {
    x.dtype() == DType::F32 && w.dtype() == DType::BF16
}

/// The weight an op on `x` runs with, and whether its fused CPU kernel runs it. A bf16 `w`
/// beside f32 `x` ([`is_bf16_weight`]) reaches the fused kernels as it is (they read it as f32,
/// one layer at a time, so the graph keeps the bf16 tensor only); the portable path gets an f32
/// copy. It must be frozen: gradients are f32, for f32 parameters. `others`: the op's further
/// inputs, in `x`'s dtype.
pub(crate) fn weight_and_path<'a>(
    x: &Tensor,
    w: &'a Tensor,
    others: &[&Tensor],
) -> Result<(std::borrow::Cow<'a, Tensor>, bool)> {
    use std::borrow::Cow;
    let mut inputs = vec![x];
    inputs.extend_from_slice(others);
    if !is_bf16_weight(x, w) {
        inputs.push(w);
        return Ok((Cow::Borrowed(w), fused(&inputs)?));
    }
    if w.track_op() {
        candle_core::bail!(
            "a bf16 weight beside f32 input must be frozen; a trained weight is f32"
        );
    }
    if fused(&inputs)? {
        Ok((Cow::Borrowed(w), true))
    } else {
        Ok((Cow::Owned(w.to_dtype(x.dtype())?), false))
    }
}

/// A layer's bias as the ops take it: `(frozen, tracked)`. A frozen bias (every bias of a model
/// being tuned) is added inside the op, so that the graph keeps the layer's output once; a
/// tracked one is added afterwards by candle, so that its gradient flows.
pub(crate) fn split_bias(bias: Option<&Tensor>) -> (Option<&Tensor>, Option<&Tensor>) {
    match bias {
        Some(b) if b.track_op() => (None, Some(b)),
        b => (b, None),
    }
}

/// The dtype the portable ops compute statistics and nonlinearities in: f64 for f64 inputs,
/// f32 for everything else (as autocast does for norms and softmax).
pub(crate) fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_anything_else_is_refused_with_the_valid_ones() {
        for k in Kernels::ALL {
            assert_eq!(k.name().parse::<Kernels>().unwrap(), k);
        }
        let e = "gpu".parse::<Kernels>().unwrap_err().to_string();
        assert!(
            e.contains("ATOMTUNE_KERNELS") && e.contains("fused") && e.contains("portable"),
            "{e}"
        );
    }

    #[test]
    fn a_scope_overrides_this_thread_only_and_is_undone_after() {
        let outer = Kernels::current().unwrap();
        Kernels::Portable.scope(|| {
            assert_eq!(Kernels::current().unwrap(), Kernels::Portable);
            Kernels::Fused.scope(|| assert_eq!(Kernels::current().unwrap(), Kernels::Fused));
            assert_eq!(Kernels::current().unwrap(), Kernels::Portable);
            let other = std::thread::spawn(Kernels::overridden).join().unwrap();
            assert_eq!(other, None);
        });
        assert_eq!(Kernels::current().unwrap(), outer);
    }
}
