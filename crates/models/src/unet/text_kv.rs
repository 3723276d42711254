//! A cross-attention's keys and values of the text, kept while the text and the weights stay.
//!
//! A cross-attention projects the text embeddings (`[b, 77, context_dim]`) through `to_k` and
//! `to_v` at every UNet call, and the text of a sampler's steps, and of a training run's steps
//! on one caption, is the same every time: the products are the same numbers again. They are
//! small (77 rows), but each multiplies a whole weight: in SDXL's 70 cross-attentions that is
//! 341M weights read and packed for 77 rows, a few percent of a 512x512 training or CFG step.
//! [`TextKv`] keeps the last result and gives it again while the text is the same tensor (or
//! the same numbers: a batch's text is concatenated anew at every step) and the weights are the
//! same tensors (a delta baked in, or an adapter attached, makes new ones). Nothing is kept
//! where a gradient flows through the projection (a tracked text, as under pivotal tuning, or
//! adapters training `to_k` or `to_v`): the result would have to be part of each step's graph.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Tensor, TensorId};

use crate::nn::Linear;
use crate::Result;

/// The last text's keys and values of one cross-attention; clones share them.
#[derive(Clone, Default)]
pub(crate) struct TextKv(Arc<Mutex<Option<Entry>>>);

/// What one call projected, and from what.
struct Entry {
    /// The text (a handle on its storage, not a copy).
    text: Tensor,
    /// The `to_k` and `to_v` weights used.
    weights: (TensorId, TensorId),
    keys: Tensor,
    values: Tensor,
}

impl std::fmt::Debug for TextKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.lock().is_some();
        write!(f, "TextKv({})", if kept { "kept" } else { "empty" })
    }
}

impl TextKv {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(to_k(text), to_v(text))`: the kept pair where `text` and both weights are those it was
    /// made from, else computed now (and kept, where no gradient flows through it).
    pub(crate) fn project(
        &self,
        text: &Tensor,
        (to_k, to_v): (&Linear, &Linear),
    ) -> Result<(Tensor, Tensor)> {
        let (wk, wv) = (to_k.weight()?, to_v.weight()?);
        let now = || -> Result<(Tensor, Tensor)> {
            Ok((to_k.forward_with(text, &wk)?, to_v.forward_with(text, &wv)?))
        };
        if text.track_op() || wk.track_op() || wv.track_op() {
            return now();
        }
        let weights = (wk.id(), wv.id());
        if let Some(e) = self.lock().as_ref() {
            if e.weights == weights && same_numbers(&e.text, text)? {
                return Ok((e.keys.clone(), e.values.clone()));
            }
        }
        let (keys, values) = now()?;
        *self.lock() = Some(Entry {
            text: text.clone(),
            weights,
            keys: keys.clone(),
            values: values.clone(),
        });
        Ok((keys, values))
    }
}

/// Whether `a` and `b` hold the same numbers: the same tensor, or one of the same shape, dtype
/// and device whose numbers all compare equal (a NaN never does: such a text is projected
/// again).
fn same_numbers(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.id() == b.id() {
        return Ok(true);
    }
    if a.shape() != b.shape() || a.dtype() != b.dtype() || !a.device().same_device(b.device()) {
        return Ok(false);
    }
    let differ = a.ne(b)?.to_dtype(DType::F32)?.sum_all()?;
    Ok(differ.to_scalar::<f32>()? == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layers;
    use crate::weights::Weights;
    use atoms::adapter::{FullAdapter, LayerAdapter};
    use atoms::{Block, Layout};
    use candle_core::{Device, Var};

    /// `to_k` and `to_v` of a random cross-attention (16-wide text into 8 channels).
    fn projections(layers: &Layers) -> (Linear, Linear) {
        let w = Weights::random(7, DType::F32, &Device::Cpu);
        let k = Linear::new(&w.pp("to_k"), layers, 16, 8, false).unwrap();
        let v = Linear::new(&w.pp("to_v"), layers, 16, 8, false).unwrap();
        (k, v)
    }

    fn text(seed: f64) -> Tensor {
        let n = Tensor::arange(0f32, 2.0 * 5.0 * 16.0, &Device::Cpu).unwrap();
        (n * seed)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, 5, 16))
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The pair is kept for the same text (the same tensor, or the same numbers anew) and is
    /// what the projections give; another text, or another weight, is projected again.
    #[test]
    fn keeps_the_projections_of_the_same_text_and_weights() {
        let layers = Layers::new("test");
        let (to_k, to_v) = projections(&layers);
        let kv = TextKv::default();
        let a = text(0.1);
        let (k, v) = kv.project(&a, (&to_k, &to_v)).unwrap();
        assert_eq!(values(&k), values(&to_k.forward(&a).unwrap()));
        assert_eq!(values(&v), values(&to_v.forward(&a).unwrap()));
        // the same tensor, and a copy of its numbers: the kept tensors themselves
        for same in [a.clone(), a.copy().unwrap()] {
            let (k2, v2) = kv.project(&same, (&to_k, &to_v)).unwrap();
            assert_eq!((k2.id(), v2.id()), (k.id(), v.id()));
        }
        // other numbers: projected again
        let b = text(0.2);
        let (k3, _) = kv.project(&b, (&to_k, &to_v)).unwrap();
        assert_ne!(k3.id(), k.id());
        assert_eq!(values(&k3), values(&to_k.forward(&b).unwrap()));
        // a delta baked into to_k: its new weight is used, not the kept keys
        let base = to_k.weight().unwrap();
        let diff = (base.ones_like().unwrap() * 0.5).unwrap();
        let layout = Layout::from_shape(base.dims(), Block { rows: 1, cols: 1 }).unwrap();
        let adapter = LayerAdapter::Full(FullAdapter::from_diff(layout, &base, &diff).unwrap());
        layers.attach("to_k", adapter, 1.0).unwrap();
        layers.bake().unwrap();
        let (k4, v4) = kv.project(&b, (&to_k, &to_v)).unwrap();
        let want = b
            .broadcast_matmul(&(base + 0.5).unwrap().t().unwrap())
            .unwrap();
        let err = (k4 - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        assert_eq!(values(&v4), values(&to_v.forward(&b).unwrap()));
    }

    /// A text that is trained (pivotal tuning) gets its gradient through the projections: it is
    /// never served from what a former call kept.
    #[test]
    fn a_tracked_text_is_projected_in_the_graph() {
        let layers = Layers::new("test");
        let (to_k, to_v) = projections(&layers);
        let kv = TextKv::default();
        let a = text(0.1);
        kv.project(&a, (&to_k, &to_v)).unwrap();
        let var = Var::from_tensor(&a).unwrap();
        let (k, v) = kv.project(var.as_tensor(), (&to_k, &to_v)).unwrap();
        let grads = (k.sum_all().unwrap() + v.sum_all().unwrap())
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(var.as_tensor()).expect("the text has a gradient");
        assert!(values(g).iter().any(|&x| x != 0.0));
    }
}
