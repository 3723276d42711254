//! Single-file checkpoints: one `.safetensors` in the original LDM layout, as A1111, ComfyUI and
//! Civitai share them (`model.diffusion_model.*`, `first_stage_model.*`, and the text encoders
//! under `cond_stage_model.*` or, for SDXL, `conditioner.embedders.*`).
//!
//! The file holds weights only. Configs and tokenizers come from `--model-config` (a diffusers
//! folder or hub repo, like diffusers' `from_single_file(..., config=)`) or, without it, from the
//! family the keys show: the public configs of SD 1.5, SD 2.1 (or 2.1-base with
//! `--prediction-type epsilon`) and SDXL base ([`crate::presets`]) and the built-in CLIP
//! tokenizer. What the weights cannot tell, v-prediction or epsilon, is the prediction type:
//! SD 2.x files default to v-prediction (SD 2.1 at 768), the others to epsilon.

pub mod keys;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use candle_core::safetensors::MmapedSafetensors;

use crate::arch::Architecture;
use crate::config::{ClipConfig, UnetConfig, UpBlock, VaeConfig};
use crate::pipeline::LoadOptions;
use crate::presets::Preset;
use crate::text::{TextEncoder, TextEncoders};
use crate::weights::{KeyMap, Record, Take, Weights};
use crate::{ClipTextModel, ClipTokenizer, Error, Layers, Result, StableDiffusion, Unet, Vae};

/// Whether `model` names a single-file checkpoint.
pub fn is_single_file(model: &str) -> bool {
    let p = Path::new(model);
    p.is_file() && p.extension().is_some_and(|e| e == "safetensors")
}

/// The family a checkpoint's text-encoder keys show.
pub fn family(st: &MmapedSafetensors, path: &Path) -> Result<Architecture> {
    let keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if !has(keys::UNET) {
        return Err(Error::Config {
            path: path.into(),
            reason: format!(
                "no `{}*` keys: not a single-file Stable Diffusion checkpoint (a diffusers UNet file goes in a folder's unet/)",
                keys::UNET
            ),
        });
    }
    if has("conditioner.embedders.1.model.") {
        Ok(Architecture::Sdxl)
    } else if has("cond_stage_model.model.") {
        Ok(Architecture::Sd2)
    } else if has(keys::CLIP_SD1) {
        Ok(Architecture::Sd1)
    } else {
        Err(Error::Config {
            path: path.into(),
            reason: "no text encoder keys of SD 1.x (`cond_stage_model.transformer.*`), SD 2.x (`cond_stage_model.model.*`) or SDXL (`conditioner.embedders.*`)".into(),
        })
    }
}

/// The configs and tokenizers of a pipeline, from a folder or built in.
struct Configs {
    unet: UnetConfig,
    vae: VaeConfig,
    text: ClipConfig,
    text_2: Option<ClipConfig>,
    tokenizers: (ClipTokenizer, Option<ClipTokenizer>),
    scheduler: (PathBuf, String),
    force_zeros_for_empty_prompt: bool,
}

impl Configs {
    fn from_folder(dir: &Path) -> Result<Self> {
        let cfg = |sub: &str| dir.join(sub).join("config.json");
        let unet = UnetConfig::read(&cfg("unet"))?;
        let xl = unet.addition.is_some();
        let sched = dir.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&sched).map_err(|e| Error::io(&sched, e))?;
        Ok(Configs {
            vae: VaeConfig::read(&cfg("vae"))?,
            text: ClipConfig::read(&cfg("text_encoder"))?,
            text_2: xl
                .then(|| ClipConfig::read(&cfg("text_encoder_2")))
                .transpose()?,
            tokenizers: (
                ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
                xl.then(|| ClipTokenizer::from_dir(&dir.join("tokenizer_2")))
                    .transpose()?,
            ),
            scheduler: (sched, text),
            force_zeros_for_empty_prompt: xl,
            unet,
        })
    }

    fn builtin(preset: Preset) -> Result<Self> {
        let name = |f: &str| PathBuf::from(format!("<{} config>/{f}", preset.repo()));
        let text = ClipConfig::parse(
            &name("text_encoder/config.json"),
            preset.text_encoder_config(),
        )?;
        let text_2 = preset
            .text_encoder_2_config()
            .map(|t| ClipConfig::parse(&name("text_encoder_2/config.json"), t))
            .transpose()?;
        Ok(Configs {
            unet: UnetConfig::parse(&name("unet/config.json"), preset.unet_config())?,
            vae: VaeConfig::parse(&name("vae/config.json"), preset.vae_config())?,
            tokenizers: (
                ClipTokenizer::builtin(pad(&text))?,
                text_2
                    .as_ref()
                    .map(|c| ClipTokenizer::builtin(pad(c)))
                    .transpose()?,
            ),
            text,
            text_2,
            scheduler: (
                name("scheduler/scheduler_config.json"),
                preset.scheduler_config().to_string(),
            ),
            force_zeros_for_empty_prompt: preset.force_zeros_for_empty_prompt(),
        })
    }
}

/// A single-file checkpoint as a diffusers folder holds it
/// ([`StableDiffusion::load_single_file_as_folder`]).
#[derive(Clone, Debug, Default)]
pub struct AsFolder {
    /// Each component's tensors (`unet`, `vae`, `text_encoder`, `text_encoder_2`) under
    /// diffusers names.
    pub tensors: BTreeMap<&'static str, HashMap<String, Tensor>>,
    /// The folder with the configs and tokenizers used (`--model-config`), if any: its files
    /// other than weights belong beside the tensors.
    pub config_dir: Option<PathBuf>,
    /// Files to write (over the config folder's): folder-relative path -> contents.
    pub files: BTreeMap<String, String>,
}

/// Where a single file's configs came from.
enum ConfigSource {
    Folder(PathBuf),
    Builtin(Preset),
}

/// The files beside the tensors of a folder for configs `c`: the scheduler config as used
/// (`--prediction-type` applied), and, for built-in configs, every config, the tokenizers
/// and `model_index.json`.
fn folder_files(
    c: &Configs,
    source: &ConfigSource,
    family: Architecture,
) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    files.insert(
        "scheduler/scheduler_config.json".into(),
        c.scheduler.1.clone(),
    );
    let ConfigSource::Builtin(preset) = source else {
        return Ok(files);
    };
    let xl = family == Architecture::Sdxl;
    files.insert("unet/config.json".into(), preset.unet_config().into());
    files.insert("vae/config.json".into(), preset.vae_config().into());
    files.insert(
        "text_encoder/config.json".into(),
        preset.text_encoder_config().into(),
    );
    if let Some(t) = preset.text_encoder_2_config() {
        files.insert("text_encoder_2/config.json".into(), t.into());
    }
    let mut tokenizers = vec![("tokenizer", pad(&c.text))];
    if let Some(t2) = &c.text_2 {
        tokenizers.push(("tokenizer_2", pad(t2)));
    }
    for (dir, pad) in tokenizers {
        for (name, text) in crate::tokenizer::builtin_files(pad) {
            files.insert(format!("{dir}/{name}"), text);
        }
    }
    let scheduler: serde_json::Value =
        serde_json::from_str(&c.scheduler.1).map_err(|e| Error::Config {
            path: c.scheduler.0.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
    let mut index = serde_json::json!({
        "_class_name": if xl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
        "scheduler": ["diffusers", scheduler["_class_name"].as_str().unwrap_or("DDIMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if xl {
        index["text_encoder_2"] =
            serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = serde_json::json!(c.force_zeros_for_empty_prompt);
    } else {
        index["requires_safety_checker"] = serde_json::json!(false);
        index["safety_checker"] = serde_json::json!([null, null]);
        index["feature_extractor"] = serde_json::json!([null, null]);
    }
    let text = serde_json::to_string_pretty(&index).expect("a JSON value");
    files.insert("model_index.json".into(), text);
    Ok(files)
}

/// The pad token of an encoder's built-in tokenizer: OpenCLIP encoders (SD 2.x's, SDXL's
/// second) pad with "!", OpenAI CLIP's with the end token.
fn pad(c: &ClipConfig) -> &'static str {
    match c.hidden_act {
        crate::config::ClipActivation::Gelu => "!",
        crate::config::ClipActivation::QuickGelu => "<|endoftext|>",
    }
}

/// The public configs for a family (SD 2.x: 2.1 at 768, v-prediction, or 2.1-base with
/// epsilon).
fn preset_for(family: Architecture, prediction: Option<&str>) -> Preset {
    match family {
        Architecture::Sd1 => Preset::Sd15,
        Architecture::Sd2 if prediction == Some("epsilon") => Preset::Sd21Base,
        Architecture::Sd2 => Preset::Sd21,
        Architecture::Sdxl => Preset::Sdxl,
    }
}

/// The scheduler config `text` with `prediction_type` set.
pub(crate) fn with_prediction(path: &Path, text: &str, prediction: &str) -> Result<String> {
    if !["epsilon", "v_prediction"].contains(&prediction) {
        return Err(Error::Input(format!(
            "--prediction-type {prediction}: epsilon or v_prediction"
        )));
    }
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.into(),
        reason: format!("not valid JSON: {e}"),
    })?;
    v["prediction_type"] = serde_json::Value::String(prediction.into());
    Ok(v.to_string())
}

fn map(f: impl Fn(&str) -> Option<(String, Take)> + Send + Sync + 'static) -> KeyMap {
    Arc::new(f)
}

impl StableDiffusion {
    /// Loads a single-file checkpoint (see the module docs) with `opts.model_config` and
    /// `opts.prediction_type`; `id` names it in messages.
    pub fn load_single_file(path: &Path, id: &str, opts: &LoadOptions) -> Result<Self> {
        Self::single_file(path, id, opts, None)
    }

    /// [`StableDiffusion::load_single_file`], with the checkpoint as a diffusers folder holds
    /// it: each component's tensors under diffusers names, and the config and tokenizer files.
    pub fn load_single_file_as_folder(
        path: &Path,
        id: &str,
        opts: &LoadOptions,
    ) -> Result<(Self, AsFolder)> {
        let mut folder = AsFolder::default();
        let sd = Self::single_file(path, id, opts, Some(&mut folder))?;
        Ok((sd, folder))
    }

    fn single_file(
        path: &Path,
        id: &str,
        opts: &LoadOptions,
        folder: Option<&mut AsFolder>,
    ) -> Result<Self> {
        Self::read_single_file(path, id, opts, folder).map_err(|e| match (&opts.model_config, &e) {
            (None, Error::KeyShape { .. } | Error::MissingKey { .. }) => Error::Input(format!(
                "{e}\nthe file does not fit the public configs of its family; name the configs it was made with: --model-config DIR|HUB_ID"
            )),
            _ => e,
        })
    }

    fn read_single_file(
        path: &Path,
        id: &str,
        opts: &LoadOptions,
        folder: Option<&mut AsFolder>,
    ) -> Result<Self> {
        let st = Arc::new(crate::weights::map_safetensors(path)?);
        let fam = family(&st, path)?;
        let (mut c, source) = match &opts.model_config {
            Some(cfg) => {
                let dir = if Path::new(cfg).is_dir() {
                    PathBuf::from(cfg)
                } else {
                    crate::hub::fetch_config(cfg, opts.revision.as_deref())?
                };
                (Configs::from_folder(&dir)?, ConfigSource::Folder(dir))
            }
            None => {
                let preset = preset_for(fam, opts.prediction_type.as_deref());
                (Configs::builtin(preset)?, ConfigSource::Builtin(preset))
            }
        };
        if let Some(p) = &opts.prediction_type {
            c.scheduler.1 = with_prediction(&c.scheduler.0, &c.scheduler.1, p)?;
        }
        let records: [Record; 4] = Default::default();
        let recording = folder.is_some();
        let files = recording
            .then(|| folder_files(&c, &source, fam))
            .transpose()?;
        let label = path.display().to_string();
        let part = |m: KeyMap, scope: &[&str], component: usize| {
            let w = Weights::mapped(
                st.clone(),
                path.to_path_buf(),
                label.clone(),
                m,
                scope,
                opts.dtype,
                &opts.device,
            )
            .with_bf16_weights(opts.bf16_weights);
            if recording {
                w.recording_into(records[component].clone())
            } else {
                w
            }
        };

        let layout = keys::UnetLayout {
            layers_per_block: c.unet.layers_per_block,
            up_cross_attn: c
                .unet
                .up_blocks
                .iter()
                .map(|b| *b == UpBlock::CrossAttn)
                .collect(),
        };
        let w = part(
            map(move |k| {
                Some((
                    format!("{}{}", keys::UNET, keys::unet(k, &layout)?),
                    Take::Whole,
                ))
            }),
            &[keys::UNET],
            0,
        );
        let layers = Layers::new(id);
        let unet = Unet::new(&w, &c.unet, &layers)?;
        w.check_all_used()?;

        let blocks = c.vae.block_out_channels.len();
        let w = part(
            map(move |k| keys::vae(k, blocks).map(|(f, t)| (format!("{}{f}", keys::VAE), t))),
            &[keys::VAE],
            1,
        );
        let vae = Vae::new(&w, &c.vae)?;
        w.check_all_used()?;

        let te_layers = |n: &str| Layers::new(format!("{id} {n}"));
        let (tok1, tok2) = c.tokenizers;
        let first = match fam {
            Architecture::Sd2 => {
                let h = c.text.hidden_size;
                let w = part(
                    map(move |k| {
                        keys::open_clip(k, h)
                            .map(|(f, t)| (format!("cond_stage_model.model.{f}"), t))
                    }),
                    &[],
                    2,
                );
                ClipTextModel::new(&w, &c.text, &te_layers("text_encoder"))?
            }
            _ => {
                let prefix = match fam {
                    Architecture::Sdxl => "conditioner.embedders.0.transformer.",
                    _ => keys::CLIP_SD1,
                };
                let w = part(
                    map(move |k| Some((format!("{prefix}{k}"), Take::Whole))),
                    &[prefix],
                    2,
                );
                let m = ClipTextModel::new(&w, &c.text, &te_layers("text_encoder"))?;
                w.check_all_used()?;
                m
            }
        };
        let second = match (&c.text_2, tok2) {
            (Some(cfg), Some(tok)) => {
                let h = cfg.hidden_size;
                let w = part(
                    map(move |k| {
                        keys::open_clip(k, h)
                            .map(|(f, t)| (format!("conditioner.embedders.1.model.{f}"), t))
                    }),
                    &[],
                    3,
                );
                Some(TextEncoder {
                    tokenizer: Some(tok),
                    model: ClipTextModel::with_projection(&w, cfg, &te_layers("text_encoder_2"))?,
                })
            }
            _ => None,
        };
        let text = TextEncoders {
            first: TextEncoder {
                tokenizer: Some(tok1),
                model: first,
            },
            second,
        };
        crate::pipeline::check_widths(&c.unet, &text, path)?;
        let architecture = Architecture::of(&c.unet, text.first.model.config());
        if architecture != fam {
            return Err(Error::Config {
                path: path.into(),
                reason: format!(
                    "the file's keys are of an {fam} checkpoint but its configs describe an {architecture} model"
                ),
            });
        }
        layers.set_architecture(architecture.name());
        if let Some(folder) = folder {
            let names = ["unet", "vae", "text_encoder", "text_encoder_2"];
            for (name, r) in names.into_iter().zip(records) {
                let tensors = std::mem::take(&mut *r.lock().expect("lock"));
                if !tensors.is_empty() {
                    folder.tensors.insert(name, tensors);
                }
            }
            folder.files = files.unwrap_or_default();
            if let ConfigSource::Folder(dir) = source {
                folder.config_dir = Some(dir);
            }
        }
        Ok(StableDiffusion {
            id: id.to_string(),
            architecture,
            unet,
            force_zeros_for_empty_prompt: c.force_zeros_for_empty_prompt && text.is_dual(),
            text,
            vae,
            scheduler_config: c.scheduler,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in configs written as a folder read back as the same configs and tokenizers
    /// (padding as the built-in ones do: SDXL's second with "!"), under a pipeline class of the
    /// family, for SD 1.5 and SDXL.
    #[test]
    fn built_in_configs_written_as_a_folder_read_back_the_same() {
        for (preset, family) in [
            (Preset::Sd15, Architecture::Sd1),
            (Preset::Sdxl, Architecture::Sdxl),
        ] {
            let c = Configs::builtin(preset).unwrap();
            let files = folder_files(&c, &ConfigSource::Builtin(preset), family).unwrap();
            let dir = tempfile::tempdir().unwrap();
            for (rel, text) in &files {
                let p = dir.path().join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
            let back = Configs::from_folder(dir.path()).unwrap();
            assert_eq!(back.unet, c.unet, "{preset}");
            assert_eq!(back.vae, c.vae, "{preset}");
            assert_eq!(back.text, c.text, "{preset}");
            assert_eq!(back.text_2, c.text_2, "{preset}");
            assert_eq!(back.scheduler.1, c.scheduler.1, "{preset}");
            let prompt = "a photo of sks dog, Ünïcode & punctuation!";
            let pairs = [
                (Some(&back.tokenizers.0), Some(&c.tokenizers.0)),
                (back.tokenizers.1.as_ref(), c.tokenizers.1.as_ref()),
            ];
            for (got, want) in pairs {
                let (Some(got), Some(want)) = (got, want) else {
                    assert!(got.is_none() && want.is_none(), "{preset}");
                    continue;
                };
                let (g, w) = (
                    got.encode(prompt, true).unwrap(),
                    want.encode(prompt, true).unwrap(),
                );
                assert_eq!(g.ids, w.ids, "{preset}");
            }
            let index: serde_json::Value =
                serde_json::from_str(&files["model_index.json"]).unwrap();
            let class = if family == Architecture::Sdxl {
                "StableDiffusionXLPipeline"
            } else {
                "StableDiffusionPipeline"
            };
            assert_eq!(index["_class_name"], class);
            assert_eq!(
                files.contains_key("tokenizer_2/vocab.json"),
                family == Architecture::Sdxl
            );
        }
    }
}
