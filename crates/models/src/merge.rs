//! Writing a base model with deltas baked in (`atomtune merge`): a diffusers folder (every
//! component under its standard file name) or a single-file checkpoint in the original LDM
//! layout that A1111, ComfyUI and diffusers' `from_single_file` load.
//!
//! The source's tensors are copied (converted to the chosen dtype) and each adapted layer's
//! weight (UNet and text encoders) is replaced by its effective weight. What can be written:
//! folder -> folder, folder -> single file (SD 1.x's text encoder keeps transformers' layout
//! inside the file; SD 2.x's and SDXL's second are written in OpenCLIP's, q, k, v fused into
//! `in_proj`, as many layers as the diffusers encoder has), single file -> single file (any
//! family: only adapted layers' keys change, a q, k or v projection as its rows of `in_proj`),
//! single file -> folder (its tensors as loading reads them under diffusers names, beside the
//! configs of `--model-config` or the built-in ones with the CLIP tokenizer).

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
    /// A single-file checkpoint read as a folder holds it (to write a folder).
    SingleFileAsFolder(crate::single_file::AsFolder),
}

/// `tensors` to `path` as safetensors in `dtype`, written atomically ([`atoms::io::write_atomic_with`]).
/// Each tensor is converted as the map is consumed, so the originals go as their copies come.
fn save(tensors: HashMap<String, Tensor>, path: &Path, dtype: DType) -> Result<()> {
    let converted = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atoms::io::write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(&converted, tmp).map_err(|e| {
            atoms::Error::Safetensors(format!("{}: could not write: {e}", path.display()))
        })
    })?;
    Ok(())
}

/// The tensors of `path`, each converted to `dtype` as it is read from the mapped file (whose
/// pages are let go once copied): a component is held once, in the dtype it is written in,
/// not as the file's bytes plus their tensors (candle's `safetensors::load` reads the whole
/// file into memory first).
fn load(path: &Path, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let invalid = |e| crate::weights::invalid_safetensors(path, e);
    let st = crate::weights::map_safetensors(path)?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = st
                .load(&name, &Device::Cpu)
                .map_err(invalid)?
                .to_dtype(dtype)?;
            crate::weights::release_pages(view.data());
            Ok((name, t))
        })
        .collect()
}

/// A component's weights in a folder: every `.safetensors` file of `dir/sub` (one file or
/// shards; with `variant`, the variant's).
fn component(
    dir: &Path,
    sub: &str,
    stem: &str,
    variant: Option<&str>,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in crate::pipeline::weight_files(&dir.join(sub), stem, variant)? {
        all.extend(load(&f, dtype)?);
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

/// The adapted layers' effective weights, by component: layer (diffusers / transformers module
/// name) -> weight.
#[derive(Debug, Default)]
pub struct Baked {
    /// The UNet's.
    pub unet: BTreeMap<String, Tensor>,
    /// Each text encoder's, in the model's order (`text_encoder`, then SDXL's `text_encoder_2`).
    pub text: Vec<BTreeMap<String, Tensor>>,
}

impl Baked {
    /// How many layers change.
    pub fn len(&self) -> usize {
        self.unet.len() + self.text.iter().map(BTreeMap::len).sum::<usize>()
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn text_encoder(&self, i: usize) -> &BTreeMap<String, Tensor> {
        static NONE: BTreeMap<String, Tensor> = BTreeMap::new();
        self.text.get(i).unwrap_or(&NONE)
    }
}

/// What a merge writes: the model's family and UNet config (for single-file key names), the
/// adapted layers' effective weights, where, and in which dtype.
pub struct MergeOutput<'a> {
    /// The model's family.
    pub family: Architecture,
    /// Its UNet config.
    pub unet: &'a crate::UnetConfig,
    /// The effective weights of the adapted layers.
    pub baked: &'a Baked,
    /// A single file when it ends in `.safetensors`, else a diffusers folder.
    pub out: &'a Path,
    /// The dtype of every tensor written.
    pub dtype: DType,
}

/// Writes `source` (its `variant` files, for a folder) with the deltas baked in.
pub fn merge(source: MergeSource, variant: Option<&str>, m: &MergeOutput<'_>) -> Result<()> {
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
        (MergeSource::Folder(dir), false) => folder_to_folder(&dir, variant, m),
        (MergeSource::Folder(dir), true) => folder_to_single(&dir, variant, &layout, m),
        (MergeSource::SingleFile(file), true) => single_to_single(&file, &layout, m),
        (MergeSource::SingleFileAsFolder(f), false) => single_to_folder(f, m),
        (MergeSource::SingleFile(_), false) | (MergeSource::SingleFileAsFolder(_), true) => {
            Err(Error::Input(
                "a single file merges into a folder from its tensors as a folder holds them (StableDiffusion::load_single_file_as_folder), into a single file from its path".into(),
            ))
        }
    }
}

fn single_to_single(file: &Path, layout: &keys::UnetLayout, m: &MergeOutput<'_>) -> Result<()> {
    let mut t = load(file, m.dtype)?;
    replace(&mut t, &m.baked.unet, |layer| {
        let k = keys::unet(&format!("{layer}.weight"), layout).ok_or_else(|| {
            Error::Input(format!(
                "UNet layer `{layer}` has no single-file counterpart"
            ))
        })?;
        Ok((format!("{}{k}", keys::UNET), Take::Whole))
    })?;
    let (first, second) = (m.baked.text_encoder(0), m.baked.text_encoder(1));
    match m.family {
        Architecture::Sd1 => replace(&mut t, first, |l| {
            Ok((format!("{}{l}.weight", keys::CLIP_SD1), Take::Whole))
        })?,
        Architecture::Sd2 => replace_open_clip(&mut t, first, "cond_stage_model.model.")?,
        Architecture::Sdxl => {
            replace(&mut t, first, |l| {
                Ok((
                    format!("conditioner.embedders.0.transformer.{l}.weight"),
                    Take::Whole,
                ))
            })?;
            replace_open_clip(&mut t, second, "conditioner.embedders.1.model.")?;
        }
    }
    save(t, m.out, m.dtype)
}

/// Replaces a text encoder's baked layers in a file holding it in OpenCLIP's layout under
/// `prefix`.
fn replace_open_clip(
    tensors: &mut HashMap<String, Tensor>,
    baked: &BTreeMap<String, Tensor>,
    prefix: &str,
) -> Result<()> {
    replace(tensors, baked, |layer| {
        // every layer the mapping fuses (q, k, v) is square: its width is the encoder's
        let hidden = baked[layer].dim(0)?;
        let (k, take) = keys::open_clip(&format!("{layer}.weight"), hidden).ok_or_else(|| {
            Error::Input(format!(
                "text encoder layer `{layer}` has no OpenCLIP counterpart"
            ))
        })?;
        Ok((format!("{prefix}{k}"), take))
    })
}

/// Replaces each baked layer's weight in `tensors` at the key `key_of` gives, taken as it says
/// (the whole tensor, or its rows of a fused one); the key must be there with room for it.
fn replace(
    tensors: &mut HashMap<String, Tensor>,
    baked: &BTreeMap<String, Tensor>,
    key_of: impl Fn(&str) -> Result<(String, Take)>,
) -> Result<()> {
    for (layer, w) in baked {
        let (key, take) = key_of(layer)?;
        let old = tensors.get(&key).ok_or_else(|| {
            Error::Input(format!(
                "the source has no `{key}` for the adapted layer `{layer}`"
            ))
        })?;
        let w = w.to_device(&Device::Cpu)?.to_dtype(old.dtype())?;
        let new = match take {
            Take::Rows(start, len) => {
                let rows = old.dim(0)?;
                if start + len > rows || w.dim(0)? != len {
                    return Err(Error::Input(format!(
                        "`{key}` has {rows} rows: no room for the adapted layer `{layer}` at rows {start}..{}",
                        start + len
                    )));
                }
                let mut parts = vec![old.narrow(0, 0, start)?, w];
                parts.push(old.narrow(0, start + len, rows - start - len)?);
                Tensor::cat(&parts, 0)?
            }
            Take::Transpose => w.t()?.contiguous()?,
            Take::Whole | Take::Squeeze => w,
        };
        let new = if old.dims() == new.dims() {
            new
        } else {
            new.reshape(old.dims())?
        };
        tensors.insert(key, new);
    }
    Ok(())
}

/// Replaces the baked layers of diffusers component `sub` (`unet`, `text_encoder`,
/// `text_encoder_2`; others have none) in its tensors, under diffusers names.
fn replace_component(
    tensors: &mut HashMap<String, Tensor>,
    sub: &str,
    baked: &Baked,
) -> Result<()> {
    match sub {
        "unet" => replace(tensors, &baked.unet, |l| {
            Ok((format!("{l}.weight"), Take::Whole))
        }),
        "text_encoder" => replace_text(tensors, baked.text_encoder(0)),
        "text_encoder_2" => replace_text(tensors, baked.text_encoder(1)),
        _ => Ok(()),
    }
}

/// Replaces a text encoder's baked layers in its diffusers-folder tensors, whose keys may lack
/// the `text_model.` prefix (transformers 5.6 and later).
fn replace_text(
    tensors: &mut HashMap<String, Tensor>,
    baked: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let unprefixed = !tensors.keys().any(|k| k.starts_with("text_model."));
    replace(tensors, baked, |l| {
        let key = match l.strip_prefix("text_model.") {
            Some(rest) if unprefixed => rest,
            _ => l,
        };
        Ok((format!("{key}.weight"), Take::Whole))
    })
}

fn folder_to_folder(dir: &Path, variant: Option<&str>, m: &MergeOutput<'_>) -> Result<()> {
    let (out, dtype) = (m.out, m.dtype);
    copy_configs(dir, out)?;
    for (sub, stem) in COMPONENTS {
        if !dir.join(sub).is_dir() {
            continue;
        }
        let mut t = component(dir, sub, stem, variant, dtype)?;
        replace_component(&mut t, sub, m.baked)?;
        save(t, &out.join(sub).join(format!("{stem}.safetensors")), dtype)?;
    }
    Ok(())
}

/// A single file's tensors, under diffusers names, and its configs and tokenizers as a diffusers
/// folder.
fn single_to_folder(f: crate::single_file::AsFolder, m: &MergeOutput<'_>) -> Result<()> {
    if let Some(dir) = &f.config_dir {
        copy_configs(dir, m.out)?;
    }
    for (rel, text) in &f.files {
        let path = m.out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    for (sub, mut t) in f.tensors {
        replace_component(&mut t, sub, m.baked)?;
        let stem = COMPONENTS
            .iter()
            .find(|(c, _)| *c == sub)
            .map_or("diffusion_pytorch_model", |(_, stem)| stem);
        save(
            t,
            &m.out.join(sub).join(format!("{stem}.safetensors")),
            m.dtype,
        )?;
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
    let mut unet = component(dir, "unet", "diffusion_pytorch_model", variant, m.dtype)?;
    replace_component(&mut unet, "unet", m.baked)?;
    for (k, t) in unet {
        let ldm = keys::unet(&k, layout).ok_or_else(|| {
            Error::Input(format!("UNet tensor `{k}` has no single-file counterpart"))
        })?;
        all.insert(format!("{}{ldm}", keys::UNET), t);
    }
    let blocks = vae_cfg.block_out_channels.len();
    for (k, t) in component(dir, "vae", "diffusion_pytorch_model", variant, m.dtype)? {
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
    let text = |sub: &str| -> Result<HashMap<String, Tensor>> {
        let mut t = with_text_model_prefix(component(dir, sub, "model", variant, m.dtype)?);
        replace_component(&mut t, sub, m.baked)?;
        Ok(t)
    };
    let te = text("text_encoder")?;
    match m.family {
        Architecture::Sd1 => prefixed(&mut all, te, keys::CLIP_SD1),
        Architecture::Sd2 => open_clip(&mut all, te, "cond_stage_model.model.")?,
        Architecture::Sdxl => {
            prefixed(&mut all, te, "conditioner.embedders.0.transformer.");
            let te2 = text("text_encoder_2")?;
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
