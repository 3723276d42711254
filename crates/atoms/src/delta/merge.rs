//! Baking deltas into base weights.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;

use super::{BaseFit, Delta};
use crate::adapter::param_dtype;
use crate::base::BaseWeights;
use crate::{Adapter, Result};

/// Bakes `deltas`, each with its weight, into `base`: for every layer any of them tunes,
/// `W' = W + sum_k weight_k dW_k`, where each `dW_k` is computed from the base weight `W` (deltas
/// stack; they do not see each other). Returns the merged weights, in the base's dtype, by layer,
/// and how each delta fits the base (fingerprints; with `strict`, a differing base is an error).
pub fn merge(
    base: &dyn BaseWeights,
    deltas: &[(&Delta, f64)],
    strict: bool,
) -> Result<(BTreeMap<String, Tensor>, Vec<BaseFit>)> {
    let fits = deltas
        .iter()
        .map(|(d, _)| d.check_base(base, strict))
        .collect::<Result<Vec<_>>>()?;
    let layers: BTreeSet<&String> = deltas.iter().flat_map(|(d, _)| d.layers().keys()).collect();
    let mut merged = BTreeMap::new();
    for layer in layers {
        let w = base.weight(layer)?;
        let mut acc = w.to_dtype(param_dtype(w.dtype()))?;
        for (delta, weight) in deltas {
            if *weight == 0.0 || !delta.layers().contains_key(layer) {
                continue;
            }
            acc = (acc + delta.layer_adapter(layer, &w)?.delta_weight(&w, *weight)?)?;
        }
        merged.insert(layer.clone(), acc.to_dtype(w.dtype())?);
    }
    Ok((merged, fits))
}
