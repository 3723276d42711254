//! Loading a whole Stable Diffusion pipeline: from a local diffusers folder, a Hugging Face Hub
//! repo id (through `hf-hub`, honouring the user's cache, `HF_HOME`, `HF_ENDPOINT` and
//! `HF_TOKEN`), or a random-weight preset.
//!
//! Only `.safetensors` weights load; a folder that has only pickles gets an error that says how
//! to convert it. `variant = "fp16"` picks `<name>.fp16.safetensors` files (as diffusers'
//! `variant=`); without it the full-precision files are preferred and fp16 files used when they
//! are all there is. Weights are converted to the requested dtype once, at load.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::{ClipConfig, UnetConfig, VaeConfig};
use crate::presets::Preset;
use crate::weights::Weights;
use crate::{ClipTextModel, ClipTokenizer, Error, Layers, Result, Unet, Vae};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Weights are converted to this dtype.
    pub dtype: DType,
    /// And placed on this device.
    pub device: Device,
    /// `fp16` to read `*.fp16.safetensors` files.
    pub variant: Option<String>,
    /// Hub revision (branch, tag or commit); `main` by default.
    pub revision: Option<String>,
    /// Seed of random presets.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            revision: None,
            seed: 0,
        }
    }
}

/// Where a model comes from, as users write it.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSpec {
    /// A local diffusers folder.
    Local(PathBuf),
    /// A hub repo id, `owner/name`.
    Hub(String),
    /// A random-weight preset (`sd15-random`...).
    Random(Preset),
}

impl ModelSpec {
    /// Reads `--model`: an existing folder, a preset name, or else a hub id `owner/name`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Ok(p) = s.parse::<Preset>() {
            return Ok(ModelSpec::Random(p));
        }
        let path = Path::new(s);
        if path.exists() {
            return Ok(ModelSpec::Local(path.to_path_buf()));
        }
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() == 2 && parts.iter().all(|p| ok(p)) && !s.starts_with('.') {
            return Ok(ModelSpec::Hub(s.to_string()));
        }
        Err(Error::Input(format!(
            "model `{s}` is not a folder, a hub repo id (owner/name) or a preset (sd15-random, sd21-random, sd21-base-random)"
        )))
    }
}

/// A loaded pipeline's models.
pub struct StableDiffusion {
    /// How the user named it (hub id, path or preset): recorded in deltas and PNGs.
    pub id: String,
    /// The denoiser, with its adapter hook.
    pub unet: Unet,
    /// The text encoder.
    pub text_encoder: ClipTextModel,
    /// The tokenizer; random presets have none (there is no vocabulary to make up).
    pub tokenizer: Option<ClipTokenizer>,
    /// The autoencoder.
    pub vae: Vae,
    /// `scheduler/scheduler_config.json`: its path (for messages) and text.
    pub scheduler_config: (PathBuf, String),
}

impl StableDiffusion {
    /// Loads `model` (see [`ModelSpec::parse`]).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        match ModelSpec::parse(model)? {
            ModelSpec::Local(dir) => Self::load_dir(&dir, model, opts),
            ModelSpec::Hub(repo) => {
                let dir = crate::hub::fetch_pipeline(&repo, opts)?;
                Self::load_dir(&dir, model, opts)
            }
            ModelSpec::Random(p) => Self::random(p, opts),
        }
    }

    /// Loads a local diffusers folder; `id` names it in messages and outputs.
    pub fn load_dir(dir: &Path, id: &str, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.into(),
                what: "model folder".into(),
                hint: "give a diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id".into(),
            });
        }
        let sub = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_dir() {
                Ok(p)
            } else {
                Err(Error::MissingFile {
                    path: p,
                    what: format!("{name}/ folder"),
                    hint: "a Stable Diffusion diffusers folder has unet/, vae/, text_encoder/, tokenizer/ and scheduler/".into(),
                })
            }
        };
        let config = |folder: &Path, name: &str| -> Result<PathBuf> {
            let p = folder.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::MissingFile {
                    path: p,
                    what: "config".into(),
                    hint: "the folder is incomplete; download it again".into(),
                })
            }
        };
        check_model_index(dir)?;
        let unet_dir = sub("unet")?;
        let unet_cfg = UnetConfig::read(&config(&unet_dir, "config.json")?)?;
        let w = weights(&unet_dir, "diffusion_pytorch_model", opts)?;
        let unet = Unet::new(&w, &unet_cfg, &Layers::new(id))?;
        w.check_all_used()?;

        let vae_dir = sub("vae")?;
        let vae_cfg = VaeConfig::read(&config(&vae_dir, "config.json")?)?;
        let w = weights(&vae_dir, "diffusion_pytorch_model", opts)?;
        let vae = Vae::new(&w, &vae_cfg)?;
        w.check_all_used()?;

        let te_dir = sub("text_encoder")?;
        let te_cfg = ClipConfig::read(&config(&te_dir, "config.json")?)?;
        let w = weights(&te_dir, "model", opts)?;
        let text_encoder =
            ClipTextModel::new(&w, &te_cfg, &Layers::new(format!("{id} text encoder")))?;
        w.check_all_used()?;

        let tokenizer = ClipTokenizer::from_dir(&sub("tokenizer")?)?;
        let sched_path = config(&sub("scheduler")?, "scheduler_config.json")?;
        let sched = std::fs::read_to_string(&sched_path).map_err(|e| Error::io(&sched_path, e))?;
        Ok(StableDiffusion {
            id: id.to_string(),
            unet,
            text_encoder,
            tokenizer: Some(tokenizer),
            vae,
            scheduler_config: (sched_path, sched),
        })
    }

    /// The architecture of `preset` with random weights seeded by `opts.seed`.
    pub fn random(preset: Preset, opts: &LoadOptions) -> Result<Self> {
        let name = |f: &str| PathBuf::from(format!("<{}>/{f}", preset.name()));
        let w = Weights::random(opts.seed, opts.dtype, &opts.device);
        let unet_cfg = UnetConfig::parse(&name("unet/config.json"), preset.unet_config())?;
        let vae_cfg = VaeConfig::parse(&name("vae/config.json"), preset.vae_config())?;
        let te_cfg = ClipConfig::parse(
            &name("text_encoder/config.json"),
            preset.text_encoder_config(),
        )?;
        Ok(StableDiffusion {
            id: preset.name().to_string(),
            unet: Unet::new(&w.pp("unet"), &unet_cfg, &Layers::new(preset.name()))?,
            vae: Vae::new(&w.pp("vae"), &vae_cfg)?,
            text_encoder: ClipTextModel::new(
                &w.pp("text_encoder"),
                &te_cfg,
                &Layers::new("text encoder"),
            )?,
            tokenizer: None,
            scheduler_config: (
                name("scheduler/scheduler_config.json"),
                preset.scheduler_config().to_string(),
            ),
        })
    }
}

/// Checks `model_index.json` (when present) names a pipeline whose parts we can load, so that an
/// SDXL or SD3 folder is refused by name instead of failing on a missing key.
fn check_model_index(dir: &Path) -> Result<()> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Ok(());
    }
    let j = crate::config::Json::read(&path)?;
    let class = j.str_or("_class_name", "StableDiffusionPipeline")?;
    let ok = class.starts_with("StableDiffusion")
        && !class.contains("XL")
        && !class.starts_with("StableDiffusion3");
    if !ok {
        return Err(j.unsupported(
            "_class_name",
            &class,
            "Stable Diffusion 1.x / 2.x pipelines",
        ));
    }
    for (part, want) in [
        ("unet", "UNet2DConditionModel"),
        ("vae", "AutoencoderKL"),
        ("text_encoder", "CLIPTextModel"),
    ] {
        if let Some(found) = j.component_class(part) {
            if found != want {
                return Err(j.unsupported(part, &found, want));
            }
        }
    }
    Ok(())
}

/// The weights of one component folder: `<stem>[.variant].safetensors`, or the shards its
/// `.safetensors.index.json` lists.
pub(crate) fn weights(dir: &Path, stem: &str, opts: &LoadOptions) -> Result<Weights> {
    let files = weight_files(dir, stem, opts.variant.as_deref())?;
    Weights::from_files(&files, opts.dtype, &opts.device)
}

/// The weight files of a component folder (see [`weights`]).
pub fn weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let names: Vec<String> = match variant {
        Some(v) => vec![format!("{stem}.{v}.safetensors")],
        None => vec![
            format!("{stem}.safetensors"),
            format!("{stem}.fp16.safetensors"),
        ],
    };
    for name in &names {
        let single = dir.join(name);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            return shards(&index);
        }
    }
    for pickle in [
        format!("{stem}.bin"),
        format!("{stem}.ckpt"),
        format!("{stem}.fp16.bin"),
    ] {
        if dir.join(&pickle).is_file() {
            return Err(Error::Pickle {
                path: dir.join(pickle),
            });
        }
    }
    Err(Error::MissingFile {
        path: dir.join(&names[0]),
        what: "weights".into(),
        hint: match variant {
            Some(v) => {
                format!("no `{v}` variant here; drop --variant to use the full-precision weights")
            }
            None => "the folder is incomplete; download it again".into(),
        },
    })
}

fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.into(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.into(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| index.with_file_name(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
