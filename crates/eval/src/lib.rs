//! # eval: the DreamBooth metrics
//!
//! How papers measure a personalized model (Ruiz et al. 2023): subject fidelity as DINO and
//! CLIP-I similarity between generated images and the subject's real photos, prompt fidelity as
//! CLIP-T similarity between each generated image and its prompt.
//!
//! - [`preprocess`]: each model's `preprocessor_config.json` (resize, crop, mean/std);
//! - [`vit`]: DINO's ViT (`facebook/dino-vits16`), [CLS] features;
//! - [`clip`]: CLIP's image and text towers (`openai/clip-vit-base-patch32`), projected;
//! - [`metrics`]: the three means and per-image values;
//! - [`Evaluator`]: both models loaded from a hub id or a local folder.
#![deny(missing_docs)]

pub mod clip;
mod error;
pub mod metrics;
pub mod preprocess;
pub mod vit;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

pub use error::{Error, Result};
pub use metrics::{ImageScore, Scores};

use clip::{ClipModel, ClipModelConfig};
use preprocess::Preprocessor;
use vit::{VitConfig, VitModel};

/// The DINO model of the protocol.
pub const DEFAULT_DINO: &str = "facebook/dino-vits16";
/// The CLIP model of the protocol.
pub const DEFAULT_CLIP: &str = "openai/clip-vit-base-patch32";

/// Images per forward pass.
const CHUNK: usize = 16;

/// A model folder: `model` itself when it is a folder, else the hub repo `model` (fetched into
/// or read from the Hugging Face cache) with `files` and those of `optional` it has.
pub fn model_dir(
    model: &str,
    revision: Option<&str>,
    files: &[&str],
    optional: &[&str],
) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() || model.split('/').count() != 2 {
        return Err(Error::Input(format!(
            "`{model}` is neither a model folder nor a hub repo id (owner/name)"
        )));
    }
    Ok(models::hub::fetch_files(model, revision, files, optional)?)
}

/// The weights file of a transformers model folder (`model.safetensors`), refusing pickles.
fn weights(dir: &Path, device: &Device) -> Result<models::Weights> {
    let file = dir.join("model.safetensors");
    if !file.is_file() {
        return Err(Error::Input(format!(
            "{}: no model.safetensors (only safetensors weights are read: a pickle such as pytorch_model.bin can run code); convert the model with transformers' `save_pretrained(..., safe_serialization=True)` and pass its folder",
            dir.display()
        )));
    }
    Ok(models::Weights::from_files(&[file], DType::F32, device)?)
}

/// DINO's ViT and CLIP, each with its preprocessing.
pub struct Evaluator {
    dino: (Preprocessor, VitModel),
    clip: (Preprocessor, ClipModel),
    device: Device,
}

impl Evaluator {
    /// Loads the DINO model `dino` and the CLIP model `clip`, each a local folder or a hub id.
    pub fn load(dino: &str, clip: &str, device: &Device) -> Result<Self> {
        let common = [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
        ];
        let d = model_dir(dino, None, &common, &[])?;
        let c = model_dir(
            clip,
            None,
            &common,
            &[
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.json",
                "merges.txt",
            ],
        )?;
        Self::load_dirs(&d, &c, device)
    }

    /// Loads the models from local folders.
    pub fn load_dirs(dino: &Path, clip: &Path, device: &Device) -> Result<Self> {
        let vit = VitModel::new(
            &weights(dino, device)?,
            &VitConfig::read(&dino.join("config.json"))?,
        )?;
        let cfg = ClipModelConfig::read(&clip.join("config.json"))?;
        let clip_model = ClipModel::new(&weights(clip, device)?, &cfg, clip)?;
        Ok(Evaluator {
            dino: (
                Preprocessor::read(&dino.join("preprocessor_config.json"))?,
                vit,
            ),
            clip: (
                Preprocessor::read(&clip.join("preprocessor_config.json"))?,
                clip_model,
            ),
            device: device.clone(),
        })
    }

    fn batched(
        &self,
        images: &[RgbImage],
        pre: &Preprocessor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(CHUNK) {
            let px = chunk
                .iter()
                .map(|i| pre.apply(i, &self.device))
                .collect::<Result<Vec<_>>>()?;
            out.push(f(&Tensor::stack(&px, 0)?)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// DINO's [CLS] features of `images`, `[n, hidden]`.
    pub fn dino_features(&self, images: &[RgbImage]) -> Result<Tensor> {
        let (pre, vit) = &self.dino;
        self.batched(images, pre, &|px| vit.cls(px))
    }

    /// CLIP's projected image embeddings of `images`, `[n, projection_dim]`.
    pub fn clip_image(&self, images: &[RgbImage]) -> Result<Tensor> {
        let (pre, clip) = &self.clip;
        self.batched(images, pre, &|px| clip.image_embeds(px))
    }

    /// CLIP's projected text embeddings of `prompts`, `[n, projection_dim]`.
    pub fn clip_text(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in prompts.chunks(CHUNK) {
            out.push(self.clip.1.text_embeds(chunk, &self.device)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The scores of `generated` images with their `prompts` against the `real` photos.
    pub fn evaluate(
        &self,
        generated: &[RgbImage],
        prompts: &[&str],
        real: &[RgbImage],
    ) -> Result<Scores> {
        if generated.is_empty() || real.is_empty() || prompts.len() != generated.len() {
            return Err(Error::Input(format!(
                "{} generated images, {} prompts, {} real photos: each needs at least one, and one prompt per generated image",
                generated.len(),
                prompts.len(),
                real.len()
            )));
        }
        metrics::score(
            &self.dino_features(generated)?,
            &self.dino_features(real)?,
            &self.clip_image(generated)?,
            &self.clip_image(real)?,
            &self.clip_text(prompts)?,
        )
    }
}
