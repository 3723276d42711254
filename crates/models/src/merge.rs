//! Writing a base model with deltas baked in (`atomtune merge`): a diffusers folder (every
//! component under its standard file name) or a single-file checkpoint in the original LDM
//! layout that A1111, ComfyUI and diffusers' `from_single_file` load.
//!
//! The source's tensors are copied (converted to the chosen dtype) and each adapted UNet layer's
//! weight is replaced by its effective weight. What can be written: folder -> folder, folder ->
//! single file (SD 1.x's text encoder keeps transformers' layout inside the file; SD 2.x's and
//! SDXL's second are written in OpenCLIP's, q, k, v fused into `in_proj`, as many layers as the
//! diffusers encoder has), single file -> single file (any family: only UNet keys change).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::arch::Architecture;
use crate::single_file::keys;
use crate::weights::Take;
use crate::{Error, Result};

/// Where the base model's files are.
#[derive(Clone, Debug)]
pub enum MergeSource {
    /// A diffusers folder (local, or a hub snapshot).
    Folder(PathBuf),
    /// A single-file checkpoint.
    SingleFile(PathBuf),
}

/// `tensors` to `path` as safetensors in `dtype`, through a temporary file renamed over it.
/// Each tensor is converted as the map is consumed, so the originals go as their copies come.
fn save(tensors: HashMap<String, Tensor>, path: &Path, dtype: DType) -> Result<()> {
    let converted = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.atomtune-tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("merged")
    ));
    candle_core::safetensors::save(&converted, &tmp).map_err(|e| Error::Config {
        path: path.into(),
        reason: format!("could not write: {e}"),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Config {
        path: path.into(),
        reason: format!("not a valid safetensors file: {e}"),
    })
}

/// A component's weights in a folder: every `.safetensors` file of `dir/sub` (one file or
/// shards; with `variant`, the variant's).
fn component(
    dir: &Path,
    sub: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in crate::pipeline::weight_files(&dir.join(sub), stem, variant)? {
        all.extend(load(&f)?);
    }
    Ok(all)
}

/// The components of a diffusers pipeline folder: (sub-folder, weight file stem).
const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
];

/// What a merge writes: the model's family and UNet config (for single-file key names), the
/// adapted UNet layers' effective weights, where, and in which dtype.
pub struct MergeOutput<'a> {
    /// The model's family.
    pub family: Architecture,
    /// Its UNet config.
    pub unet: &'a crate::UnetConfig,
    /// UNet layer -> effective weight.
    pub baked: &'a BTreeMap<String, Tensor>,
    /// A single file when it ends in `.safetensors`, else a diffusers folder.
    pub out: &'a Path,
    /// The dtype of every tensor written.
    pub dtype: DType,
}

/// Writes `source` (its `variant` files, for a folder) with the deltas baked in.
pub fn merge(source: &MergeSource, variant: Option<&str>, m: &MergeOutput<'_>) -> Result<()> {
    let single_out = m.out.extension().is_some_and(|e| e == "safetensors");
    let layout = keys::UnetLayout {
        layers_per_block: m.unet.layers_per_block,
        up_cross_attn: m
            .unet
            .up_blocks
            .iter()
            .map(|b| *b == crate::config::UpBlock::CrossAttn)
            .collect(),
    };
    match (source, single_out) {
        (MergeSource::Folder(dir), false) => folder_to_folder(dir, variant, m),
        (MergeSource::Folder(dir), true) => folder_to_single(dir, variant, &layout, m),
        (MergeSource::SingleFile(file), true) => {
            let mut t = load(file)?;
            replace_unet(&mut t, m.baked, |layer| ldm_unet_key(&layout, layer))?;
            save(t, m.out, m.dtype)
        }
        (MergeSource::SingleFile(_), false) => Err(Error::Input(
            "a single-file model merges into a single file: give an --out ending in .safetensors"
                .into(),
        )),
    }
}

fn ldm_unet_key(layout: &keys::UnetLayout, layer: &str) -> Result<String> {
    keys::unet(&format!("{layer}.weight"), layout)
        .map(|k| format!("{}{k}", keys::UNET))
        .ok_or_else(|| {
            Error::Input(format!(
                "UNet layer `{layer}` has no single-file counterpart"
            ))
        })
}

/// Replaces each baked layer's weight in `tensors`, at the key `key_of` gives; the key must be
/// there with the same shape.
fn replace_unet(
    tensors: &mut HashMap<String, Tensor>,
    baked: &BTreeMap<String, Tensor>,
    key_of: impl Fn(&str) -> Result<String>,
) -> Result<()> {
    for (layer, w) in baked {
        let key = key_of(layer)?;
        let old = tensors.get(&key).ok_or_else(|| {
            Error::Input(format!(
                "the source has no `{key}` for the adapted layer `{layer}`"
            ))
        })?;
        let w = w.to_device(&Device::Cpu)?;
        let w = if old.dims() == w.dims() {
            w
        } else {
            w.reshape(old.dims())?
        };
        tensors.insert(key, w);
    }
    Ok(())
}

fn folder_to_folder(dir: &Path, variant: Option<&str>, m: &MergeOutput<'_>) -> Result<()> {
    let (out, dtype) = (m.out, m.dtype);
    copy_configs(dir, out)?;
    for (sub, stem) in COMPONENTS {
        if !dir.join(sub).is_dir() {
            continue;
        }
        let mut t = component(dir, sub, stem, variant)?;
        if sub == "unet" {
            replace_unet(&mut t, m.baked, |l| Ok(format!("{l}.weight")))?;
        }
        save(t, &out.join(sub).join(format!("{stem}.safetensors")), dtype)?;
    }
    Ok(())
}

/// Every file of the folder but weights (configs, tokenizers, scheduler, model_index.json).
fn copy_configs(dir: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
        let p = e.path();
        let dst = out.join(e.file_name());
        if p.is_dir() {
            copy_configs(&p, &dst)?;
        } else {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let weights = [
                ".safetensors",
                ".bin",
                ".ckpt",
                ".safetensors.index.json",
                ".bin.index.json",
            ];
            if weights.iter().any(|w| name.ends_with(w)) {
                continue;
            }
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            std::fs::copy(&p, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

fn folder_to_single(
    dir: &Path,
    variant: Option<&str>,
    layout: &keys::UnetLayout,
    m: &MergeOutput<'_>,
) -> Result<()> {
    let vae_cfg = crate::VaeConfig::read(&dir.join("vae/config.json"))?;
    let mut all = HashMap::new();
    let mut unet = component(dir, "unet", "diffusion_pytorch_model", variant)?;
    replace_unet(&mut unet, m.baked, |l| Ok(format!("{l}.weight")))?;
    for (k, t) in unet {
        let ldm = keys::unet(&k, layout).ok_or_else(|| {
            Error::Input(format!("UNet tensor `{k}` has no single-file counterpart"))
        })?;
        all.insert(format!("{}{ldm}", keys::UNET), t);
    }
    let blocks = vae_cfg.block_out_channels.len();
    for (k, t) in component(dir, "vae", "diffusion_pytorch_model", variant)? {
        let (ldm, take) = keys::vae(&k, blocks).ok_or_else(|| {
            Error::Input(format!("VAE tensor `{k}` has no single-file counterpart"))
        })?;
        // the original VAE's attention projections are 1x1 convs
        let t = if take == Take::Squeeze && t.rank() == 2 {
            let (o, i) = t.dims2()?;
            t.reshape((o, i, 1, 1))?
        } else {
            t
        };
        all.insert(format!("{}{ldm}", keys::VAE), t);
    }
    let te = with_text_model_prefix(component(dir, "text_encoder", "model", variant)?);
    match m.family {
        Architecture::Sd1 => prefixed(&mut all, te, keys::CLIP_SD1),
        Architecture::Sd2 => open_clip(&mut all, te, "cond_stage_model.model.")?,
        Architecture::Sdxl => {
            prefixed(&mut all, te, "conditioner.embedders.0.transformer.");
            let te2 = with_text_model_prefix(component(dir, "text_encoder_2", "model", variant)?);
            open_clip(&mut all, te2, "conditioner.embedders.1.model.")?;
        }
    }
    save(all, m.out, m.dtype)
}

/// A text encoder's tensors under transformers' `text_model.` prefix, which single files keep:
/// transformers 5.6 and later save `CLIPTextModel` without it (`text_projection` stays outside).
fn with_text_model_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, t)| {
            if k.starts_with("text_model.") || k.starts_with("text_projection") {
                (k, t)
            } else {
                (format!("text_model.{k}"), t)
            }
        })
        .collect()
}

fn prefixed(all: &mut HashMap<String, Tensor>, tensors: HashMap<String, Tensor>, prefix: &str) {
    all.extend(
        tensors
            .into_iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t)),
    );
}

/// A transformers CLIP text encoder written in OpenCLIP's layout under `prefix`: q, k, v fused
/// back into `in_proj`, the projection transposed.
fn open_clip(
    all: &mut HashMap<String, Tensor>,
    tensors: HashMap<String, Tensor>,
    prefix: &str,
) -> Result<()> {
    let hidden = tensors
        .get("text_model.final_layer_norm.weight")
        .ok_or_else(|| Error::Input("the text encoder has no final_layer_norm".into()))?
        .dim(0)?;
    let mut fused: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    for (k, t) in tensors {
        if k.ends_with("position_ids") {
            continue;
        }
        let (file_key, take) = keys::open_clip(&k, hidden).ok_or_else(|| {
            Error::Input(format!(
                "text encoder tensor `{k}` has no OpenCLIP counterpart"
            ))
        })?;
        match take {
            Take::Rows(start, _) => fused.entry(file_key).or_default().push((start, t)),
            Take::Transpose => {
                all.insert(format!("{prefix}{file_key}"), t.t()?.contiguous()?);
            }
            Take::Whole | Take::Squeeze => {
                all.insert(format!("{prefix}{file_key}"), t);
            }
        }
    }
    for (file_key, mut parts) in fused {
        parts.sort_by_key(|(start, _)| *start);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        all.insert(format!("{prefix}{file_key}"), Tensor::cat(&parts, 0)?);
    }
    Ok(())
}
