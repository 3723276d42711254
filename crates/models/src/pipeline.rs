//! Loading a whole Stable Diffusion pipeline: from a local diffusers folder, a Hugging Face Hub
//! repo id (through `hf-hub`, honouring the user's cache, `HF_HOME`, `HF_ENDPOINT` and
//! `HF_TOKEN`), or a random-weight preset.
//!
//! Only `.safetensors` weights load; a folder that has only pickles gets an error that says how
//! to convert it. `variant = "fp16"` picks `<name>.fp16.safetensors` files (as diffusers'
//! `variant=`); without it the full-precision files are preferred and fp16 files used when they
//! are all there is. Weights are converted to the requested dtype once, at load.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::arch::Architecture;
use crate::config::{ClipConfig, Json, UnetConfig, VaeConfig};
use crate::presets::Preset;
use crate::text::{PromptEmbeds, TextEncoder, TextEncoders};
use crate::weights::Weights;
use crate::{ClipTextModel, ClipTokenizer, Error, Layers, Result, TextTime, Unet, Vae};

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
    /// For a single-file checkpoint: the diffusers folder or hub repo whose configs and
    /// tokenizers to use (default: the public ones of the family its keys show).
    pub model_config: Option<String>,
    /// `epsilon` or `v_prediction`: overrides the scheduler config's prediction type (single
    /// files cannot say which; SD 2.x files default to v-prediction).
    pub prediction_type: Option<String>,
    /// With `dtype` f32: conv and linear weights kept in bf16, the CPU's mixed precision
    /// ([`Weights::with_bf16_weights`]; `atomtune --dtype bf16`, and `auto` where the CPU has
    /// AVX512-BF16).
    pub bf16_weights: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
            revision: None,
            seed: 0,
            model_config: None,
            prediction_type: None,
            bf16_weights: false,
        }
    }
}

/// Where a model comes from, as users write it.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSpec {
    /// A local diffusers folder.
    Local(PathBuf),
    /// A single-file checkpoint (`.safetensors` in the original LDM layout).
    SingleFile(PathBuf),
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
        if crate::single_file::is_single_file(s) {
            return Ok(ModelSpec::SingleFile(path.to_path_buf()));
        }
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
            "model `{s}` is not a folder, a single-file .safetensors checkpoint, a hub repo id (owner/name) or a preset ({})",
            Preset::names()
        )))
    }
}

/// A loaded pipeline's models.
pub struct StableDiffusion {
    /// How the user named it (hub id, path or preset): recorded in deltas and PNGs.
    pub id: String,
    /// Its family (SD 1.x, 2.x, XL), recorded in deltas.
    pub architecture: Architecture,
    /// The denoiser, with its adapter hook.
    pub unet: Unet,
    /// The text encoders and their tokenizers.
    pub text: TextEncoders,
    /// The autoencoder.
    pub vae: Vae,
    /// `scheduler/scheduler_config.json`: its path (for messages) and text.
    pub scheduler_config: (PathBuf, String),
    /// SDXL's `force_zeros_for_empty_prompt` (`model_index.json`): without a negative prompt the
    /// unconditional embeddings are zeros rather than the encoding of "".
    pub force_zeros_for_empty_prompt: bool,
}

/// A component folder of a pipeline folder, or an error that says what it should hold.
fn component(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(Error::MissingFile {
            path: p,
            what: format!("{name}/ folder"),
            hint: "a Stable Diffusion diffusers folder has unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/ and tokenizer_2/)".into(),
        })
    }
}

/// `name` in `folder`, or an error that says the folder is incomplete.
fn config_file(folder: &Path, name: &str) -> Result<PathBuf> {
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
}

/// The text encoder in `dir/<encoder>` with the tokenizer in `dir/<tokenizer>`.
fn load_text_encoder(
    dir: &Path,
    (encoder, tokenizer): (&str, &str),
    projection: bool,
    id: &str,
    opts: &LoadOptions,
) -> Result<TextEncoder> {
    let te_dir = component(dir, encoder)?;
    let cfg = ClipConfig::read(&config_file(&te_dir, "config.json")?)?;
    let w = weights(&te_dir, "model", opts)?;
    let layers = Layers::new(format!("{id} {encoder}"));
    let model = if projection {
        ClipTextModel::with_projection(&w, &cfg, &layers)?
    } else {
        ClipTextModel::new(&w, &cfg, &layers)?
    };
    w.check_all_used()?;
    Ok(TextEncoder {
        tokenizer: Some(ClipTokenizer::from_dir(&component(dir, tokenizer)?)?),
        model,
    })
}

impl StableDiffusion {
    /// Loads `model` (see [`ModelSpec::parse`]).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let spec = ModelSpec::parse(model)?;
        if opts.model_config.is_some() && !matches!(spec, ModelSpec::SingleFile(_)) {
            return Err(Error::Input(format!(
                "--model-config is for single-file checkpoints; `{model}` carries its own configs"
            )));
        }
        let mut sd = match spec {
            ModelSpec::SingleFile(path) => return Self::load_single_file(&path, model, opts),
            ModelSpec::Local(dir) => Self::load_dir(&dir, model, opts)?,
            ModelSpec::Hub(repo) => {
                let dir = crate::hub::fetch_pipeline(&repo, opts)?;
                Self::load_dir(&dir, model, opts)?
            }
            ModelSpec::Random(p) => Self::random(p, opts)?,
        };
        if let Some(p) = &opts.prediction_type {
            let (path, text) = &sd.scheduler_config;
            sd.scheduler_config.1 = crate::single_file::with_prediction(path, text, p)?;
        }
        Ok(sd)
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
        let index = ModelIndex::read(dir)?;
        let unet_dir = component(dir, "unet")?;
        let unet_cfg = UnetConfig::read(&config_file(&unet_dir, "config.json")?)?;
        let layers = Layers::new(id);
        let w = weights(&unet_dir, "diffusion_pytorch_model", opts)?;
        let unet = Unet::new(&w, &unet_cfg, &layers)?;
        w.check_all_used()?;

        let vae_dir = component(dir, "vae")?;
        let vae_cfg = VaeConfig::read(&config_file(&vae_dir, "config.json")?)?;
        let w = weights(&vae_dir, "diffusion_pytorch_model", opts)?;
        let vae = Vae::new(&w, &vae_cfg)?;
        w.check_all_used()?;

        let first = load_text_encoder(dir, ("text_encoder", "tokenizer"), false, id, opts)?;
        let second = if unet_cfg.addition.is_some() {
            Some(load_text_encoder(
                dir,
                ("text_encoder_2", "tokenizer_2"),
                true,
                id,
                opts,
            )?)
        } else {
            None
        };
        let text = TextEncoders { first, second };
        check_widths(&unet_cfg, &text, &unet_dir.join("config.json"))?;
        let architecture = Architecture::of(&unet_cfg, text.first.model.config());
        layers.set_architecture(architecture.name());

        let force_zeros_for_empty_prompt = index.force_zeros_for_empty_prompt && text.is_dual();
        let sched_path = config_file(&component(dir, "scheduler")?, "scheduler_config.json")?;
        let sched = std::fs::read_to_string(&sched_path).map_err(|e| Error::io(&sched_path, e))?;
        Ok(StableDiffusion {
            id: id.to_string(),
            architecture,
            unet,
            text,
            vae,
            scheduler_config: (sched_path, sched),
            force_zeros_for_empty_prompt,
        })
    }

    /// The architecture of `preset` with random weights seeded by `opts.seed`.
    pub fn random(preset: Preset, opts: &LoadOptions) -> Result<Self> {
        let name = |f: &str| PathBuf::from(format!("<{}>/{f}", preset.name()));
        let w = Weights::random(opts.seed, opts.dtype, &opts.device)
            .with_bf16_weights(opts.bf16_weights);
        let unet_cfg = UnetConfig::parse(&name("unet/config.json"), preset.unet_config())?;
        let vae_cfg = VaeConfig::parse(&name("vae/config.json"), preset.vae_config())?;
        let te_cfg = ClipConfig::parse(
            &name("text_encoder/config.json"),
            preset.text_encoder_config(),
        )?;
        let first = TextEncoder {
            tokenizer: None,
            model: ClipTextModel::new(
                &w.pp("text_encoder"),
                &te_cfg,
                &Layers::new("text encoder"),
            )?,
        };
        let second = match preset.text_encoder_2_config() {
            None => None,
            Some(text) => {
                let cfg = ClipConfig::parse(&name("text_encoder_2/config.json"), text)?;
                Some(TextEncoder {
                    tokenizer: None,
                    model: ClipTextModel::with_projection(
                        &w.pp("text_encoder_2"),
                        &cfg,
                        &Layers::new("text encoder 2"),
                    )?,
                })
            }
        };
        let text = TextEncoders { first, second };
        check_widths(&unet_cfg, &text, &name("unet/config.json"))?;
        let layers = Layers::new(preset.name());
        let architecture = Architecture::of(&unet_cfg, &te_cfg);
        layers.set_architecture(architecture.name());
        Ok(StableDiffusion {
            id: preset.name().to_string(),
            architecture,
            unet: Unet::new(&w.pp("unet"), &unet_cfg, &layers)?,
            vae: Vae::new(&w.pp("vae"), &vae_cfg)?,
            text,
            scheduler_config: (
                name("scheduler/scheduler_config.json"),
                preset.scheduler_config().to_string(),
            ),
            force_zeros_for_empty_prompt: preset.force_zeros_for_empty_prompt(),
        })
    }

    /// Encodes `prompts` for the UNet (on its device); returns a warning per prompt that was
    /// cut to the tokenizer's length.
    pub fn encode(&self, prompts: &[&str]) -> Result<(PromptEmbeds, Vec<String>)> {
        self.text.encode(prompts, self.unet.device(), &self.id)
    }

    /// SDXL's added conditioning of a batch: the pooled embeddings of `embeds` and one set of
    /// time ids per element (`time_ids [b, 6]`); `None` for models without it.
    pub fn text_time(&self, embeds: &PromptEmbeds, time_ids: &Tensor) -> Option<TextTime> {
        embeds.pooled.as_ref().map(|p| TextTime {
            text_embeds: p.clone(),
            time_ids: time_ids.clone(),
        })
    }
}

/// The UNet attends to text as wide as the encoders give it (both penultimate states side by
/// side for SDXL), and SDXL's added embedding takes the second encoder's projection.
pub(crate) fn check_widths(unet: &UnetConfig, text: &TextEncoders, path: &Path) -> Result<()> {
    let width: usize = match &text.second {
        None => text.first.model.config().hidden_size,
        Some(s) => text.first.model.config().hidden_size + s.model.config().hidden_size,
    };
    let bad = |reason: String| {
        Err(Error::Config {
            path: path.into(),
            reason,
        })
    };
    if width != unet.cross_attention_dim {
        return bad(format!(
            "cross_attention_dim {} does not match the text encoders' width {width}",
            unet.cross_attention_dim
        ));
    }
    if let (Some(add), Some(s)) = (unet.addition, &text.second) {
        let p = s.model.config().projection_dim;
        if add.pooled_dim() != p {
            return bad(format!(
                "projection_class_embeddings_input_dim {} is 6 x addition_time_embed_dim ({}) plus {}, but text_encoder_2's projection_dim is {p}",
                add.input_dim,
                add.time_embed_dim,
                add.pooled_dim()
            ));
        }
    }
    Ok(())
}

/// What `model_index.json` (when present) says: the pipeline class must be one whose parts we
/// load (an SD3 or Flux folder is refused by name instead of failing on a missing key).
struct ModelIndex {
    force_zeros_for_empty_prompt: bool,
}

impl ModelIndex {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        if !path.is_file() {
            return Ok(ModelIndex {
                force_zeros_for_empty_prompt: true,
            });
        }
        let j = Json::read(&path)?;
        let class = j.str_or("_class_name", "StableDiffusionPipeline")?;
        let xl = class == "StableDiffusionXLPipeline";
        let ok = xl
            || (class.starts_with("StableDiffusion")
                && !class.contains("XL")
                && !class.starts_with("StableDiffusion3"));
        if !ok {
            return Err(j.unsupported(
                "_class_name",
                &class,
                "Stable Diffusion 1.x / 2.x / XL text-to-image pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)",
            ));
        }
        let mut parts = vec![
            ("unet", "UNet2DConditionModel"),
            ("vae", "AutoencoderKL"),
            ("text_encoder", "CLIPTextModel"),
        ];
        if xl {
            parts.push(("text_encoder_2", "CLIPTextModelWithProjection"));
        }
        for (part, want) in parts {
            match j.component_class(part) {
                Some(found) if found != want => return Err(j.unsupported(part, &found, want)),
                None if xl => {
                    return Err(j.unsupported(
                        part,
                        "null",
                        &format!("{want} (SDXL refiners, which lack it, are not supported)"),
                    ))
                }
                _ => {}
            }
        }
        Ok(ModelIndex {
            force_zeros_for_empty_prompt: j.bool_or("force_zeros_for_empty_prompt", true)?,
        })
    }
}

/// The weights of one component folder: `<stem>[.variant].safetensors`, or the shards its
/// `.safetensors.index.json` lists.
pub(crate) fn weights(dir: &Path, stem: &str, opts: &LoadOptions) -> Result<Weights> {
    let files = weight_files(dir, stem, opts.variant.as_deref())?;
    Ok(Weights::from_files(&files, opts.dtype, &opts.device)?.with_bf16_weights(opts.bf16_weights))
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
    if files.is_empty() {
        return Err(Error::Config {
            path: index.into(),
            reason: "`weight_map` names no shard files".into(),
        });
    }
    Ok(files)
}
