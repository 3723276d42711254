//! Adapter files in the kohya / LyCORIS layout (community LoRAs, LoCons, LyCORIS "full" diffs,
//! and what `atomtune export` writes): modules named `lora_unet_*` / `lora_te*_*`, each a
//! `.diff`, or a `.lora_down.weight` and `.lora_up.weight` with an optional `.alpha`.
//!
//! A LoRA module changes its layer by `up @ down * alpha / rank` (alpha defaults to the rank), as
//! kohya's scripts, A1111, ComfyUI and diffusers' `load_lora_weights` apply it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::adapter::{FullAdapter, LoraAdapter};
use crate::{Block, Error, LayerAdapter, Layout, Result};

/// One module of the file.
#[derive(Clone, Debug)]
pub enum Module {
    /// LyCORIS "full": the weight change itself.
    Diff(Tensor),
    /// A LoRA (on a linear layer) or LoCon (on a conv).
    Lora {
        /// `[r, ci(, kh, kw)]`.
        down: Tensor,
        /// `[co, r(, 1, 1)]`.
        up: Tensor,
        /// The scale numerator (the rank when absent).
        alpha: Option<f64>,
    },
    /// A kind atomtune does not read (LoHa, LoKr, ...), by the suffix found.
    Other(String),
}

impl Module {
    /// `diff`, `locon`, `lora`, or the unknown suffix.
    pub fn kind(&self) -> &str {
        match self {
            Module::Diff(_) => "diff",
            Module::Lora { down, .. } if down.rank() == 4 => "locon",
            Module::Lora { .. } => "lora",
            Module::Other(s) => s,
        }
    }
}

/// A kohya / LyCORIS adapter file.
#[derive(Clone, Debug)]
pub struct AdapterFile {
    /// Module name -> module.
    pub modules: BTreeMap<String, Module>,
    /// The file's metadata.
    pub metadata: HashMap<String, String>,
    /// Bundled textual-inversion embeddings (`bundle_emb.<name>.<key>`: `string_to_param.*`
    /// for SD 1.x/2.x, `clip_l` and `clip_g` for SDXL; `[n, hidden]`), by name then key.
    pub embeddings: BTreeMap<String, BTreeMap<String, Tensor>>,
}

impl AdapterFile {
    /// Reads a file; keys outside `lora_*` modules are not counted.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::io::map(path)?;
        let bad = |e: String| Error::Safetensors(format!("{}: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut parts: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        let mut embeddings: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            if let Some((name, k)) = key
                .strip_prefix("bundle_emb.")
                .and_then(|rest| rest.split_once('.'))
            {
                let t = t.to_dtype(candle_core::DType::F32)?;
                embeddings
                    .entry(name.to_string())
                    .or_default()
                    .insert(k.to_string(), t);
                continue;
            }
            if let Some((module, suffix)) =
                key.split_once('.').filter(|(m, _)| m.starts_with("lora_"))
            {
                parts
                    .entry(module.to_string())
                    .or_default()
                    .insert(suffix.to_string(), t);
            }
        }
        let modules = parts
            .into_iter()
            .map(|(name, mut p)| {
                let m = if let Some(d) = p.remove("diff") {
                    Module::Diff(d)
                } else if let (Some(down), Some(up)) =
                    (p.remove("lora_down.weight"), p.remove("lora_up.weight"))
                {
                    let alpha = match p.remove("alpha") {
                        Some(a) => Some(
                            a.to_dtype(candle_core::DType::F64)?
                                .flatten_all()?
                                .to_vec1::<f64>()?[0],
                        ),
                        None => None,
                    };
                    Module::Lora { down, up, alpha }
                } else {
                    Module::Other(p.keys().next().cloned().unwrap_or_default())
                };
                Ok((name, m))
            })
            .collect::<Result<_>>()?;
        Ok(AdapterFile {
            modules,
            metadata: meta.metadata().clone().unwrap_or_default(),
            embeddings,
        })
    }

    /// The adapter of `module` on its layer's base weight `base`.
    pub fn adapter(&self, module: &str, base: &Tensor) -> Result<LayerAdapter> {
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::UnknownLayer {
                layer: module.into(),
            })?;
        // a file's LoRA or diff is whole-matrix: no filter blocks, so any linear shape fits
        // (atoms' default 4x4 blocks refused a [37, 32] layer)
        let layout = Layout::from_shape(base.dims(), Block { rows: 1, cols: 1 })?;
        match m {
            Module::Diff(d) => Ok(LayerAdapter::Full(FullAdapter::from_diff(
                layout,
                base,
                &d.to_device(base.device())?,
            )?)),
            Module::Lora { down, up, alpha } => {
                let rank = down.dims().first().copied().unwrap_or(1);
                let dev = base.device();
                Ok(LayerAdapter::Lora(LoraAdapter::from_parts(
                    layout,
                    base,
                    &down.to_device(dev)?,
                    &up.to_device(dev)?,
                    alpha.unwrap_or(rank as f64),
                )?))
            }
            Module::Other(kind) => Err(Error::invalid(
                "adapter module",
                module,
                format!("its kind (`{kind}`) is not one atomtune reads: diff, LoRA or LoCon"),
            )),
        }
    }
}

/// A file `--delta` names: an atomtune delta, or a kohya / LyCORIS adapter file.
#[derive(Clone, Debug)]
pub enum AnyDelta {
    /// An atomtune delta.
    Atomtune(Box<crate::Delta>),
    /// A kohya / LyCORIS file.
    Kohya(AdapterFile),
}

impl AnyDelta {
    /// Reads `path`: an atomtune delta if its metadata says so, else a kohya / LyCORIS file with
    /// at least one `lora_*` module.
    pub fn read(path: &Path) -> Result<Self> {
        match crate::Delta::read(path) {
            Ok(d) => Ok(AnyDelta::Atomtune(Box::new(d))),
            Err(Error::NotADelta { .. }) => {
                let f = AdapterFile::read(path)?;
                if f.modules.is_empty() {
                    return Err(Error::Safetensors(format!(
                        "{}: neither an atomtune delta nor a kohya / LyCORIS adapter file (no `lora_*` modules)",
                        path.display()
                    )));
                }
                Ok(AnyDelta::Kohya(f))
            }
            Err(e) => Err(e),
        }
    }

    /// The atomtune delta, if this is one.
    pub fn atomtune(&self) -> Option<&crate::Delta> {
        match self {
            AnyDelta::Atomtune(d) => Some(d),
            AnyDelta::Kohya(_) => None,
        }
    }
}
