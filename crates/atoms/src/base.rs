//! The base weights a delta is checked against and applied to, looked up by diffusers layer name
//! (`down_blocks.0.resnets.0.conv1`; the weight is the tensor `<layer>.weight`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A source of base weights by layer name.
pub trait BaseWeights {
    /// A name for the base in messages (a hub id or a path).
    fn id(&self) -> &str;

    /// The base's model family (`sd1`, `sd2`, `sdxl`), when known.
    fn architecture(&self) -> Option<String> {
        None
    }

    /// The shape of `layer`'s weight, or `None` if the base has no such layer.
    fn weight_shape(&self, layer: &str) -> Option<Vec<usize>>;

    /// `layer`'s weight.
    fn weight(&self, layer: &str) -> Result<Tensor>;
}

/// Base weights in one `.safetensors` file with diffusers key names (such as a diffusers UNet's
/// `diffusion_pytorch_model.safetensors`), memory-mapped.
pub struct SafetensorsBase {
    id: String,
    architecture: Option<String>,
    path: PathBuf,
    st: MmapedSafetensors,
    device: Device,
}

impl SafetensorsBase {
    /// Maps `path`; weights are loaded on `device` when asked for.
    pub fn open(path: &Path, id: impl Into<String>, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        // SAFETY: the file is mapped read-only; like every tool that maps checkpoints we assume
        // nobody rewrites it while it is open.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))?;
        Ok(SafetensorsBase {
            id: id.into(),
            architecture: None,
            path: path.to_path_buf(),
            st,
            device: device.clone(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every layer of the file: the keys ending in `.weight`, without it.
    pub fn layers(&self) -> Vec<String> {
        self.st
            .tensors()
            .into_iter()
            .filter_map(|(k, _)| k.strip_suffix(".weight").map(String::from))
            .collect()
    }

    /// Records the base's model family (`sd1`, `sd2`, `sdxl`), which deltas are checked against.
    pub fn with_architecture(mut self, name: Option<String>) -> Self {
        self.architecture = name;
        self
    }
}

impl BaseWeights for SafetensorsBase {
    fn id(&self) -> &str {
        &self.id
    }

    fn architecture(&self) -> Option<String> {
        self.architecture.clone()
    }

    fn weight_shape(&self, layer: &str) -> Option<Vec<usize>> {
        self.st
            .get(&format!("{layer}.weight"))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn weight(&self, layer: &str) -> Result<Tensor> {
        let key = format!("{layer}.weight");
        self.st
            .load(&key, &self.device)
            .map_err(|e| Error::Safetensors(format!("{}: `{key}`: {e}", self.path.display())))
    }
}

/// Base weights held in memory, by layer name (tests, and models that own their tensors).
#[derive(Clone, Debug, Default)]
pub struct TensorBase {
    id: String,
    weights: BTreeMap<String, Tensor>,
}

impl TensorBase {
    /// A base named `id` holding `weights` by layer name.
    pub fn new(id: impl Into<String>, weights: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        TensorBase {
            id: id.into(),
            weights: weights.into_iter().collect(),
        }
    }

    /// The weights, by layer name.
    pub fn weights(&self) -> &BTreeMap<String, Tensor> {
        &self.weights
    }
}

impl BaseWeights for TensorBase {
    fn id(&self) -> &str {
        &self.id
    }

    fn weight_shape(&self, layer: &str) -> Option<Vec<usize>> {
        self.weights.get(layer).map(|t| t.dims().to_vec())
    }

    fn weight(&self, layer: &str) -> Result<Tensor> {
        self.weights
            .get(layer)
            .cloned()
            .ok_or_else(|| Error::UnknownLayer {
                layer: layer.into(),
            })
    }
}
