//! Delta files on disk: serialisation, parsing and the checks that need no base.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use super::{Delta, DeltaMeta, LayerTensors, EMBEDDING_PREFIX};
use crate::adapter::lora;
use crate::{AdapterConfig, Error, Layout, Method, Result};

impl Delta {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let tensors = self
            .layers
            .iter()
            .flat_map(|(layer, tensors)| {
                tensors
                    .iter()
                    .map(move |(suffix, t)| (format!("{layer}.{suffix}"), t))
            })
            .chain(
                self.embeddings
                    .iter()
                    .map(|(enc, t)| (format!("{EMBEDDING_PREFIX}{enc}"), t)),
            );
        crate::io::safetensors_f32(tensors, self.meta.to_metadata())
    }

    /// Writes the delta to `path` atomically (a temporary file renamed over `path`).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }

    /// Reads and checks the delta file at `path` (see [`Delta::from_bytes`]).
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_bytes(&crate::io::map(path)?)
    }

    /// Parses a delta file and checks everything that needs no base: the format and version,
    /// the metadata, that every tensor name is `<layer>.<suffix>` with a suffix of the method,
    /// that every layer has all of its tensors, all `f32`, finite, with shapes that fit the
    /// method's hyper-parameters and each other, and a fingerprint per layer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors(e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors(e.to_string()))?;
        let meta = match header.metadata() {
            Some(m) => DeltaMeta::from_metadata(m)?,
            None => return Err(Error::NotADelta { found: None }),
        };
        let method = meta.config.method;
        let mut layers: BTreeMap<String, LayerTensors> = BTreeMap::new();
        let mut embeddings = BTreeMap::new();
        for (name, view) in st.iter() {
            if let Some(encoder) = name.strip_prefix(EMBEDDING_PREFIX) {
                embeddings.insert(encoder.to_string(), tensor_of(name, &view)?);
                continue;
            }
            let unexpected = || Error::UnexpectedTensor {
                tensor: name.to_string(),
                method: method.to_string(),
                expected: method.suffixes().join(","),
            };
            let (layer, suffix) = name.rsplit_once('.').ok_or_else(unexpected)?;
            if layer.is_empty() || !method.suffixes().contains(&suffix) {
                return Err(unexpected());
            }
            layers
                .entry(layer.to_string())
                .or_default()
                .insert(suffix.to_string(), tensor_of(name, &view)?);
        }
        for (layer, tensors) in &layers {
            for suffix in method.suffixes() {
                if !tensors.contains_key(*suffix) {
                    return Err(Error::MissingTensor {
                        layer: layer.clone(),
                        suffix: suffix.to_string(),
                    });
                }
            }
            check_layer(layer, tensors, &meta.config)?;
            if !meta.fingerprints.contains_key(layer) {
                return Err(Error::meta(
                    "fingerprints",
                    format!("no fingerprint for layer `{layer}`"),
                ));
            }
        }
        if let Some(extra) = meta.fingerprints.keys().find(|k| !layers.contains_key(*k)) {
            return Err(Error::meta(
                "fingerprints",
                format!("names layer `{extra}`, which has no tensors"),
            ));
        }
        Delta {
            meta,
            layers,
            embeddings: BTreeMap::new(),
        }
        .with_embeddings(embeddings)
    }
}

/// An `f32` tensor on the CPU from a view, refusing other dtypes, odd ranks and non-finite values.
fn tensor_of(name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    if view.dtype() != Dtype::F32 {
        return Err(Error::Dtype {
            tensor: name.into(),
            found: format!("{:?}", view.dtype()),
            expected: "F32".into(),
        });
    }
    let shape = view.shape().to_vec();
    if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
        return Err(Error::TensorShape {
            tensor: name.into(),
            found: shape,
            expected: vec![],
        });
    }
    // The safetensors parser has checked that the data holds exactly prod(shape) f32s.
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if values.iter().any(|x| !x.is_finite()) {
        return Err(Error::invalid(
            "delta tensor",
            name,
            "holds NaN or infinite values",
        ));
    }
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

fn shape_error(layer: &str, suffix: &str, t: &Tensor, expected: Vec<usize>) -> Error {
    Error::TensorShape {
        tensor: format!("{layer}.{suffix}"),
        found: t.dims().to_vec(),
        expected,
    }
}

/// Checks that a layer's tensors fit the method's hyper-parameters and each other.
fn check_layer(layer: &str, t: &LayerTensors, c: &AdapterConfig) -> Result<()> {
    let err = |s: &str, expected: Vec<usize>| shape_error(layer, s, &t[s], expected);
    match c.method {
        Method::Atoms | Method::AtomsRec => {
            let atoms = t["atoms"].dims();
            let &[m, d] = atoms else {
                return Err(err(
                    "atoms",
                    vec![c.atoms.unwrap_or(1), atoms[atoms.len() - 1]],
                ));
            };
            if m > d || c.atoms.is_some_and(|k| k.min(d) != m) {
                return Err(err("atoms", vec![c.atoms.map_or(d, |k| k.min(d)), d]));
            }
            if c.method == Method::Atoms {
                if t["delta"].dims() != [m, d] {
                    return Err(err("delta", vec![m, d]));
                }
            } else {
                let m1 = c.sub_atoms;
                if t["d1"].dims() != [m, m1, d] {
                    return Err(err("d1", vec![m, m1, d]));
                }
                let beta = t["beta"].dims();
                if beta.len() != 3 || beta[1..] != [m, m1] {
                    return Err(err("beta", vec![beta[0], m, m1]));
                }
            }
        }
        Method::Lora => {
            let down = t["lora_down"].dims();
            let r = c.rank;
            if !(down.len() == 2 || down.len() == 4) || down[0] != r {
                let mut want = down.to_vec();
                want[0] = r;
                return Err(err("lora_down", want));
            }
            let up = t["lora_up"].dims();
            let want: Vec<usize> = if down.len() == 2 {
                vec![up[0], r]
            } else {
                vec![up[0], r, 1, 1]
            };
            if up != want.as_slice() {
                return Err(err("lora_up", want));
            }
        }
        Method::Full => {
            let diff = t["diff"].dims();
            if !(diff.len() == 2 || diff.len() == 4) {
                return Err(Error::UnsupportedShape {
                    shape: diff.to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// The shape every tensor of a layer must have on a base weight of `layout`, with the sizes the
/// base does not fix (`m`, `m1`, `r`) read from the layer's own, already checked, tensors.
pub(super) fn expected_shapes(
    method: Method,
    layout: &Layout,
    t: &LayerTensors,
) -> Vec<(&'static str, Vec<usize>)> {
    let d = layout.filter_dim();
    match method {
        Method::Atoms => {
            let m = t["atoms"].dims()[0];
            vec![("atoms", vec![m, d]), ("delta", vec![m, d])]
        }
        Method::AtomsRec => {
            let m = t["atoms"].dims()[0];
            let m1 = t["d1"].dims()[1];
            vec![
                ("atoms", vec![m, d]),
                ("beta", vec![layout.groups(), m, m1]),
                ("d1", vec![m, m1, d]),
            ]
        }
        Method::Lora => {
            let (down, up) = lora::file_shapes(layout, t["lora_down"].dims()[0]);
            vec![("lora_down", down), ("lora_up", up)]
        }
        Method::Full => vec![("diff", layout.shape())],
    }
}
