//! transformers' `CLIPModel` (the layout of `openai/clip-vit-base-patch32`): the vision tower
//! (patch embedding, class embedding, `pre_layrnorm`, encoder, `post_layernorm` on the class
//! token, `visual_projection`) and the text tower with `text_projection`, both projecting to the
//! top-level `projection_dim`.
//!
//! The text tower is `models`' CLIP text encoder, proven equal to transformers for Stable
//! Diffusion; the vision tower runs its encoder layers ([`models::ClipEncoder`]). Ours rather than
//! candle-transformers' `clip`, so the project has one CLIP encoder, and one tokenizer
//! ([`models::ClipTokenizer`], which reads the repos' `vocab.json` + `merges.txt`).

use std::path::Path;

use candle_core::{Device, Tensor};
use models::nn::{LayerNorm, Linear};
use models::{ClipConfig, ClipEncoder, ClipTextModel, ClipTokenizer, Layers, Weights};
use serde_json::Value;

use crate::{Error, Result};

/// The vision and text configs of a `CLIPModel` `config.json`, each projecting to
/// `projection_dim`.
#[derive(Clone, Debug)]
pub struct ClipModelConfig {
    /// `vision_config` (hidden size, layers, heads, activation, epsilon).
    pub vision: ClipConfig,
    /// Image side.
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// `text_config`, its `projection_dim` the model's.
    pub text: ClipConfig,
}

impl ClipModelConfig {
    /// Reads a `CLIPModel`'s `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Config {
            path: path.into(),
            reason,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let part = |k: &str| -> Result<&Value> {
            v.get(k)
                .filter(|x| x.is_object())
                .ok_or_else(|| bad(format!("`{k}` is missing: not a CLIPModel config")))
        };
        let (vc, tc) = (part("vision_config")?, part("text_config")?);
        let projection = v
            .get("projection_dim")
            .and_then(Value::as_u64)
            .unwrap_or(512) as usize;
        let mut vision = ClipConfig::parse(path, &vc.to_string())?;
        let mut text = ClipConfig::parse(path, &tc.to_string())?;
        vision.projection_dim = projection;
        text.projection_dim = projection;
        let n = |k: &str, d: u64| vc.get(k).and_then(Value::as_u64).unwrap_or(d) as usize;
        Ok(ClipModelConfig {
            vision,
            image_size: n("image_size", 224),
            patch_size: n("patch_size", 32),
            text,
        })
    }
}

/// CLIP's image and text encoders with their projections, and its tokenizer.
pub struct ClipModel {
    config: ClipModelConfig,
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: ClipEncoder,
    post_ln: LayerNorm,
    visual_projection: Linear,
    text: ClipTextModel,
    tokenizer: ClipTokenizer,
}

impl ClipModel {
    /// Loads a `CLIPModel` folder's weights `w` (keys `vision_model.*`, `visual_projection`,
    /// `text_model.*`, `text_projection`) and its tokenizer from `dir`.
    pub fn new(w: &Weights, c: &ClipModelConfig, dir: &Path) -> Result<Self> {
        let reg = Layers::new("clip");
        let (h, eps) = (c.vision.hidden_size, c.vision.layer_norm_eps);
        let vm = w.pp("vision_model");
        let e = vm.pp("embeddings");
        e.skip("position_ids");
        w.skip("logit_scale");
        let tokens = (c.image_size / c.patch_size).pow(2) + 1;
        Ok(ClipModel {
            patch_weight: e
                .pp("patch_embedding")
                .get((h, 3, c.patch_size, c.patch_size), "weight")?,
            class_embedding: e.get(h, "class_embedding")?,
            position_embedding: e.pp("position_embedding").get((tokens, h), "weight")?,
            pre_ln: LayerNorm::new(&vm.pp("pre_layrnorm"), h, eps)?,
            encoder: ClipEncoder::new(&vm.pp("encoder"), &c.vision, &reg)?,
            post_ln: LayerNorm::new(&vm.pp("post_layernorm"), h, eps)?,
            visual_projection: Linear::new(
                &w.pp("visual_projection"),
                &reg,
                h,
                c.vision.projection_dim,
                false,
            )?,
            text: ClipTextModel::with_projection(w, &c.text, &reg)?,
            tokenizer: ClipTokenizer::from_dir(dir)?,
            config: c.clone(),
        })
    }

    /// The projected image embeddings (`image_embeds`), `[b, projection_dim]`, of
    /// `pixels [b, 3, image_size, image_size]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, ph, pw) = pixels.dims4()?;
        if ph != c.image_size || pw != c.image_size {
            return Err(Error::Input(format!(
                "CLIP's vision tower takes {0}x{0} images, not {pw}x{ph}",
                c.image_size
            )));
        }
        let h = c.vision.hidden_size;
        let patches = pixels
            .conv2d(&self.patch_weight, 0, c.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_ln.forward(&x)?;
        let (x, _) = self.encoder.forward(&x, false)?;
        let pooled = self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// The projected text embeddings (`text_embeds`), `[n, projection_dim]`, of `prompts`
    /// (padded to the tokenizer's length, cut to it).
    pub fn text_embeds(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let ids = prompts
            .iter()
            .map(|p| {
                Ok(Tensor::new(
                    self.tokenizer.encode(p, true)?.ids.as_slice(),
                    device,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self.text.forward(&Tensor::stack(&ids, 0)?)?;
        out.text_embeds
            .ok_or_else(|| Error::Input("CLIP's text tower has no projection".into()))
    }

    /// Its tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }
}
