//! The delta file: what a training run produces and what users share (DESIGN.md "Delta file").
//!
//! A `.safetensors` file with, per tuned layer (keyed by its diffusers name), the tensors of its
//! method (see [`Method::suffixes`]), all `f32`:
//!
//! | method | tensors |
//! |---|---|
//! | `atoms` | `<layer>.atoms` `D0 [m, d]`, `<layer>.delta` `dD [m, d]` |
//! | `atoms-rec` | `<layer>.atoms` `[m, d]`, `<layer>.beta` `[g, m, m1]`, `<layer>.d1` `[m, m1, d]` |
//! | `lora` | `<layer>.lora_down` `[r, ci(, kh, kw)]`, `<layer>.lora_up` `[co, r(, 1, 1)]` |
//! | `full` | `<layer>.diff`, shaped like the weight |
//!
//! and the metadata of [`DeltaMeta`]. A delta trained with pivotal tuning also holds its trigger
//! token's learned embedding, `token_embedding.<text encoder>` `[hidden]` per text encoder
//! (`text_encoder`, and SDXL's `text_encoder_2`), read as a new token named by the metadata's
//! trigger. The coefficients are never stored: they are recomputed from
//! the base a delta is applied to (`alpha = Wr @ D0^T`), so atoms transfer to derived checkpoints
//! the way LoRAs do, and no eigen-solver runs at load time.
//!
//! Reading ([`Delta::from_bytes`]) checks every name, dtype and shape against the method and its
//! hyper-parameters; [`Delta::check_base`] checks them against a base model and compares
//! fingerprints. Nothing in a file is trusted: a bad file is an [`Error`], never a panic.

mod file;
mod merge;
mod meta;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

pub use merge::merge;
pub use meta::{DeltaMeta, FORMAT, FORMAT_VERSION};

use crate::adapter::{AtomsAdapter, AtomsRecAdapter, FullAdapter, LoraAdapter};
use crate::base::BaseWeights;
use crate::fingerprint::fingerprint;
use crate::{Adapter, Dictionary, Error, LayerAdapter, Method, Result};

/// One layer's tensors, by suffix.
pub type LayerTensors = BTreeMap<String, Tensor>;

/// A delta: metadata and per-layer tensors (f32, on the CPU).
#[derive(Clone, Debug)]
pub struct Delta {
    meta: DeltaMeta,
    layers: BTreeMap<String, LayerTensors>,
    /// The trigger token's learned embedding per text encoder (`text_encoder`,
    /// `text_encoder_2`), `[hidden]` each (pivotal tuning); empty without one.
    embeddings: BTreeMap<String, Tensor>,
}

/// The prefix of a learned token embedding's tensor name: `token_embedding.<text encoder>`.
pub const EMBEDDING_PREFIX: &str = "token_embedding.";

/// How a delta fits a base it was checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseFit {
    /// The base's id.
    pub base_id: String,
    /// Layers whose base weight differs from the one the delta was trained on.
    pub differing_layers: Vec<String>,
}

impl BaseFit {
    /// Whether every layer's base weight is the one the delta was trained on.
    pub fn is_exact(&self) -> bool {
        self.differing_layers.is_empty()
    }

    /// A warning for the user when the base differs, naming both bases.
    pub fn warning(&self, delta: &Delta) -> Option<String> {
        let first = self.differing_layers.first()?;
        Some(format!(
            "delta was trained on base `{}` but {} of its {} layer(s) differ in base `{}` (first: `{first}`); \
             applying it anyway, as to a derived checkpoint (use --strict to refuse)",
            delta.meta.base_model,
            self.differing_layers.len(),
            delta.layers.len(),
            self.base_id,
        ))
    }
}

impl Delta {
    /// A delta from trained adapters. The fingerprints of their base weights are taken from
    /// `base` (except those `meta` already holds, which callers that write many deltas of the
    /// same base reuse); `meta.config.method` must be the adapters' method.
    pub fn from_adapters<'a>(
        mut meta: DeltaMeta,
        adapters: impl IntoIterator<Item = (&'a str, &'a LayerAdapter)>,
        base: &dyn BaseWeights,
    ) -> Result<Self> {
        let mut layers = BTreeMap::new();
        let mut known = std::mem::take(&mut meta.fingerprints);
        for (name, a) in adapters {
            if a.method() != meta.config.method {
                return Err(Error::invalid(
                    "adapter method",
                    a.method(),
                    format!(
                        "layer `{name}` differs from the delta's method {}",
                        meta.config.method
                    ),
                ));
            }
            let mut t = LayerTensors::new();
            for (suffix, tensor) in a.tensors()? {
                let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                t.insert(suffix.to_string(), tensor);
            }
            let fp = match known.remove(name) {
                Some(fp) => fp,
                None => fingerprint(&base.weight(name)?)?,
            };
            meta.fingerprints.insert(name.to_string(), fp);
            layers.insert(name.to_string(), t);
        }
        Ok(Delta {
            meta,
            layers,
            embeddings: BTreeMap::new(),
        })
    }

    /// With the trigger token's learned embedding per text encoder (`text_encoder`,
    /// `text_encoder_2`: `[hidden]` each; f32 on the CPU); the metadata must name the trigger.
    pub fn with_embeddings(mut self, embeddings: BTreeMap<String, Tensor>) -> Result<Self> {
        if !embeddings.is_empty() && self.meta.trigger.is_none() {
            return Err(Error::meta(
                "trigger",
                "a delta with a token embedding must name its trigger",
            ));
        }
        for (k, t) in embeddings {
            let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            if t.rank() != 1 {
                return Err(Error::TensorShape {
                    tensor: format!("{EMBEDDING_PREFIX}{k}"),
                    found: t.dims().to_vec(),
                    expected: vec![],
                });
            }
            self.embeddings.insert(k, t);
        }
        Ok(self)
    }

    /// The trigger token's learned embedding per text encoder (empty without one).
    pub fn embeddings(&self) -> &BTreeMap<String, Tensor> {
        &self.embeddings
    }

    /// The metadata.
    pub fn meta(&self) -> &DeltaMeta {
        &self.meta
    }

    /// The metadata, to fill in training details before writing.
    pub fn meta_mut(&mut self) -> &mut DeltaMeta {
        &mut self.meta
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.meta.config.method
    }

    /// The tuned layers, by name, with their tensors.
    pub fn layers(&self) -> &BTreeMap<String, LayerTensors> {
        &self.layers
    }

    /// The number of trainable numbers (the frozen atoms stored for portability excluded).
    pub fn num_params(&self) -> usize {
        self.layers
            .values()
            .flat_map(|t| t.iter())
            .filter(|(s, _)| s.as_str() != "atoms")
            .map(|(_, t)| t.elem_count())
            .sum::<usize>()
            + self
                .embeddings
                .values()
                .map(Tensor::elem_count)
                .sum::<usize>()
    }

    /// Checks that every layer exists in `base` and every tensor's shape fits its base weight.
    pub fn check_shapes(&self, base: &dyn BaseWeights) -> Result<()> {
        for (layer, tensors) in &self.layers {
            let shape = base
                .weight_shape(layer)
                .ok_or_else(|| Error::UnknownLayer {
                    layer: layer.clone(),
                })?;
            let layout = self
                .meta
                .config
                .layout(&shape)
                .map_err(|e| Error::BaseShape {
                    layer: layer.clone(),
                    base: shape.clone(),
                    reason: e.to_string(),
                })?;
            for (suffix, want) in file::expected_shapes(self.method(), &layout, tensors) {
                let t = &tensors[suffix];
                if t.dims() != want.as_slice() {
                    return Err(Error::TensorShape {
                        tensor: format!("{layer}.{suffix}"),
                        found: t.dims().to_vec(),
                        expected: want,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks the delta against `base`: the model family when both record one (an error naming
    /// both when they differ), shapes (always an error when they do not fit) and
    /// fingerprints (a different base of the same architecture is reported in the [`BaseFit`],
    /// or refused with [`Error::FingerprintMismatch`] when `strict`).
    pub fn check_base(&self, base: &dyn BaseWeights, strict: bool) -> Result<BaseFit> {
        if let (Some(mine), Some(theirs)) = (&self.meta.base_architecture, base.architecture()) {
            if *mine != theirs {
                return Err(Error::ArchitectureMismatch {
                    delta_arch: mine.clone(),
                    delta_base: self.meta.base_model.clone(),
                    base_arch: theirs,
                    base: base.id().to_string(),
                });
            }
        }
        self.check_shapes(base)?;
        let mut differing_layers = Vec::new();
        for layer in self.layers.keys() {
            if self.meta.fingerprints.get(layer) != Some(&fingerprint(&base.weight(layer)?)?) {
                differing_layers.push(layer.clone());
            }
        }
        if strict {
            if let Some(first) = differing_layers.first() {
                return Err(Error::FingerprintMismatch {
                    delta_base: self.meta.base_model.clone(),
                    base: base.id().to_string(),
                    count: differing_layers.len(),
                    first_layer: first.clone(),
                });
            }
        }
        Ok(BaseFit {
            base_id: base.id().to_string(),
            differing_layers,
        })
    }

    /// The adapter of `layer` on its base weight `weight` (on the weight's device): trainable
    /// again, so training can resume from a delta.
    pub fn layer_adapter(&self, layer: &str, weight: &Tensor) -> Result<LayerAdapter> {
        let tensors = self.layers.get(layer).ok_or_else(|| Error::UnknownLayer {
            layer: layer.into(),
        })?;
        let config = &self.meta.config;
        let layout = config.layout(weight.dims()).map_err(|e| Error::BaseShape {
            layer: layer.into(),
            base: weight.dims().to_vec(),
            reason: e.to_string(),
        })?;
        let t = |s: &str| &tensors[s];
        let dictionary = || -> Result<Dictionary> {
            let atoms = t("atoms");
            let (m, d) = atoms.dims2()?;
            let v = crate::layout::host_f64(atoms)?;
            Dictionary::from_atoms(v, m, d, config.dictionary)
        };
        Ok(match config.method {
            Method::Atoms => LayerAdapter::Atoms(AtomsAdapter::from_dictionary(
                layout,
                weight,
                &dictionary()?,
                Some(t("delta")),
            )?),
            Method::AtomsRec => LayerAdapter::AtomsRec(AtomsRecAdapter::from_dictionary(
                layout,
                weight,
                &dictionary()?,
                t("beta"),
                t("d1"),
            )?),
            Method::Lora => LayerAdapter::Lora(LoraAdapter::from_parts(
                layout,
                weight,
                t("lora_down"),
                t("lora_up"),
                config.lora_alpha,
            )?),
            Method::Full => LayerAdapter::Full(FullAdapter::from_diff(layout, weight, t("diff"))?),
        })
    }

    /// Adapters for every layer on `base` (shapes checked first; fingerprints are
    /// [`Delta::check_base`]'s job).
    pub fn adapters(&self, base: &dyn BaseWeights) -> Result<BTreeMap<String, LayerAdapter>> {
        self.check_shapes(base)?;
        self.layers
            .keys()
            .map(|layer| {
                Ok((
                    layer.clone(),
                    self.layer_adapter(layer, &base.weight(layer)?)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
