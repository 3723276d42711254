//! A frozen weight's operands for the bf16 products, packed at their first use and kept for
//! the next ones.
//!
//! The bf16 products pack both operands of every product into the micro-kernel's panels. A
//! frozen weight packs to the same words at every call, and over few rows its packing is most
//! of the product's memory traffic: SDXL's 1280-wide transformer blocks run at 16x16 (256 rows
//! a training step) on weights of up to 1280 x 10240, so the step packed 4 GB of weights in its
//! forward and again, the other way round, in its backward; SD 1.5's 1280-channel convs at
//! 16x16 and 8x8 multiply their whole weight by 256 or 64 pixels. A layer that owns a
//! [`WeightCache`] (models' linears and convs) packs its weight once for each `Use` and keeps
//! the panels (the weight's bf16 size each) in training steps, for products of at most
//! [`MAX_ROWS`] rows: at more rows packing is a small part of the product, and the activations
//! of such a resolution need the memory. Sampling keeps nothing unless asked
//! ([`set_in_inference`], `atomtune sample --keep-packed-weights`,
//! `ATOMTUNE_KEEP_PACKED_SAMPLING=1`): a sampler's memory is the weights', and keeping doubles
//! theirs for SDXL (5.3 -> 9.3 GB, for a CFG step 12-18% faster on Zen 5).
//! `ATOMTUNE_KEEP_PACKED=0` (or [`set_enabled`]) packs at every call instead, for the memory;
//! `atomtune train --gradient-checkpointing` does too.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{Tensor, TensorId};

use crate::cpu::bf16::{self, Panels};
use crate::cpu::matmul::{Dst, Mat};
use crate::cpu::switch::Switch;
use crate::cpu::{as_f32, as_f32_mut, Float};

/// The environment variable that turns keeping off (`0`); on by default.
pub const VAR: &str = "ATOMTUNE_KEEP_PACKED";

static SWITCH: Switch = Switch::new(VAR, true, "kept weight panels");

/// The environment variable that keeps panels in inference too (`1`); off by default.
pub const INFERENCE_VAR: &str = "ATOMTUNE_KEEP_PACKED_SAMPLING";

static IN_INFERENCE: Switch = Switch::new(INFERENCE_VAR, false, "kept weight panels in sampling");

/// Whether products in inference (no input tracked: a sampler's steps) keep their frozen
/// weight's panels too, for the whole process: faster steps for the panels' memory.
pub fn set_in_inference(on: bool) {
    IN_INFERENCE.set(on);
}

/// Turns keeping packed weights on or off for the whole process (off: the caches fill no
/// further; what they hold stays until their layer drops).
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Where a layer keeps its frozen weight's packed operands; clones share them. Empty until a
/// product with bf16 operands runs on the layer.
#[derive(Clone, Default)]
pub struct WeightCache(Arc<Mutex<Slots>>);

/// The panels of one weight, by [`Use`].
#[derive(Default)]
struct Slots {
    /// The weight they were packed from: another weight (a delta baked in since) empties them.
    weight: Option<TensorId>,
    panels: [Option<Arc<Panels>>; Use::COUNT],
    /// Times another weight came: past [`MAX_CHANGES`] (a weight made anew at every call) the
    /// cache keeps nothing more.
    changes: usize,
}

/// Weights a cache follows before it gives up keeping.
const MAX_CHANGES: usize = 2;

/// The most rows (tokens times images) of a product that keeps its weight's panels: SD 1.5's
/// and SDXL's 16x16 levels at 512x512 (256 a training step, 512 a CFG step), not SDXL's
/// 32x32 level at 1024x1024 (1024 and more), whose activations fill the memory.
pub const MAX_ROWS: usize = 512;

/// What a weight's panels are packed for: each product reads the weight in its own order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Use {
    /// A linear layer's forward: `W [dout, din]` read transposed as a right operand.
    LinearForward,
    /// A linear layer's input gradient `dy W`: `W` as a right operand.
    LinearInputGrad,
    /// An adapted conv's forward on transformed columns, `y = W cols'`: `W [o, c kh kw]` as a
    /// left operand.
    ConvForward,
    /// An adapted conv's column gradient `W^T dy`: `W` read transposed as a left operand.
    ConvColumnGrads,
}

impl Use {
    const COUNT: usize = 4;

    /// Whether the weight is the product's left operand (else its right one).
    fn weight_on_left(self) -> bool {
        matches!(self, Use::ConvForward | Use::ConvColumnGrads)
    }
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightCache({} bytes)", self.bytes())
    }
}

impl WeightCache {
    /// An empty cache.
    pub fn new() -> WeightCache {
        WeightCache::default()
    }

    /// Bytes of panels kept.
    pub fn bytes(&self) -> usize {
        let slots = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slots.panels.iter().flatten().map(|p| p.bytes()).sum()
    }

    /// The cache as an op on `w` uses it when `trained` (some input of the op is tracked: a
    /// training step, whose backward reads the weight again and whose forward comes again):
    /// `None` in inference unless [`set_in_inference`] (a sampler's memory stays the
    /// weights'), where `w` may change (a tracked weight: an adapter's `W + B A`), off the CPU,
    /// or with keeping turned off.
    pub(crate) fn for_weight(&self, w: &Tensor, trained: bool) -> Option<Kept> {
        let wanted = trained || IN_INFERENCE.on();
        let keeps = wanted && !w.track_op() && w.device().is_cpu() && SWITCH.on();
        keeps.then(|| Kept {
            cache: self.clone(),
            weight: w.id(),
        })
    }
}

/// A [`WeightCache`] for one frozen weight, as an op carries it into its kernels.
#[derive(Clone)]
pub(crate) struct Kept {
    cache: WeightCache,
    weight: TensorId,
}

impl Kept {
    /// Whether products over `rows` rows (tokens, or pixels, times images) keep panels: at
    /// most [`MAX_ROWS`].
    pub(crate) fn serves(&self, rows: usize) -> bool {
        rows <= MAX_ROWS
    }

    /// The weight's panels for `usage`: packed by `pack` at the first call, kept after; `None`
    /// where this cache has given up keeping (the caller packs as usual). The lock is not held
    /// while packing (whose tasks may run other work on this thread).
    pub(crate) fn panels(&self, usage: Use, pack: impl FnOnce() -> Panels) -> Option<Arc<Panels>> {
        let lock = || self.cache.0.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut slots = lock();
            if slots.weight != Some(self.weight) {
                let changes = slots.changes + usize::from(slots.weight.is_some());
                *slots = Slots {
                    weight: Some(self.weight),
                    changes,
                    ..Slots::default()
                };
            }
            if slots.changes > MAX_CHANGES {
                return None;
            }
            if let Some(p) = &slots.panels[usage as usize] {
                return Some(p.clone());
            }
        }
        let packed = Arc::new(pack());
        let mut slots = lock();
        if slots.weight != Some(self.weight) {
            // another weight took the cache meanwhile: this one is used once
            return Some(packed);
        }
        Some(slots.panels[usage as usize].get_or_insert(packed).clone())
    }
}

impl Kept {
    /// `y (+)= x w` (`x [m, k]`, `w [k, n]`, for a [`Use`] whose weight is the right operand) or
    /// `y (+)= w x` (`w [m, k]`, `x [k, n]`, left) on the bf16 products with the weight `w`'s
    /// kept panels (packed here at their first use); `rows`: the positions over the batch the
    /// product's activations are part of (a conv runs one image at a time). `false`, with nothing
    /// done, where the products do not take it (f64, products off, too small, too many rows, or
    /// no cache).
    pub(crate) fn product<T: Float>(
        kept: Option<&Kept>,
        usage: Use,
        (y, x): (&mut [T], &[T]),
        w: Mat<'_, T>,
        (rows, accumulate): (usize, bool),
    ) -> bool {
        let (Some(kept), Some(y), Some(x), Some(w)) = (kept, as_f32_mut(y), as_f32(x), w.as_f32())
        else {
            return false;
        };
        let (wr, wc) = w.shape();
        let left = usage.weight_on_left();
        let (x, (a, b)) = if left {
            let n = x.len() / wc.max(1);
            (Mat::new(x, wc, n), ((wr, wc), (wc, n)))
        } else {
            let m = x.len() / wr.max(1);
            (Mat::new(x, m, wr), ((m, wr), (wr, wc)))
        };
        if !bf16::active() || !bf16::worth_it(a, b) || !kept.serves(rows) {
            return false;
        }
        let pack = || match left {
            true => Panels::left(&w, Vec::new()),
            false => Panels::right(&w, Vec::new()),
        };
        let Some(panels) = kept.panels(usage, pack) else {
            return false;
        };
        // SAFETY: y holds the product, which only this call writes; `panels` are `w`'s.
        unsafe { bf16::gemm_with_packed(Dst::dense(y), &panels, x, accumulate) }
    }
}
