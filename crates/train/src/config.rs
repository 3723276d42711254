//! Everything a training run is told, in one value the CLI fills from its flags.

use std::path::PathBuf;

use atoms::AdapterConfig;
use models::Targets;

use crate::loss_scale::LossScaleConfig;
use crate::lr::LrSchedule;
use crate::optim::AdamWConfig;
use crate::{Error, Result};

/// Prior preservation (DreamBooth): class images trained alongside, weighted.
#[derive(Clone, Debug)]
pub struct PriorConfig {
    /// `a photo of dog`.
    pub class_prompt: String,
    /// Where class images are (and generated ones go).
    pub class_dir: PathBuf,
    /// How many class images to use (missing ones are generated).
    pub num_class_images: usize,
    /// Weight of the class loss.
    pub weight: f64,
    /// Sampling steps for generated class images.
    pub sample_steps: usize,
}

/// Sampling a prompt during training, to watch it learn.
#[derive(Clone, Debug)]
pub struct ValidationConfig {
    /// The prompt.
    pub prompt: String,
    /// Every this many steps (and at the end).
    pub every: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Images per validation.
    pub num_images: usize,
}

/// A training run's settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The folder of subject photos.
    pub images: PathBuf,
    /// The rare token naming the subject (`sks`).
    pub token: String,
    /// The subject's class (`dog`).
    pub class_word: String,
    /// The prompt of images without a caption file; `{token}` and `{class}` are filled in.
    pub instance_prompt: String,
    /// Training resolution (short side, pixels).
    pub resolution: usize,
    /// Center crop (else random crops).
    pub center_crop: bool,
    /// Mirror images at random.
    pub flip: bool,
    /// Each image appears this many times per epoch.
    pub repeats: usize,
    /// Skip unreadable images with a warning instead of stopping.
    pub skip_bad_images: bool,
    /// Prior preservation, if on.
    pub prior: Option<PriorConfig>,
    /// The method and its hyper-parameters.
    pub adapter: AdapterConfig,
    /// Which layers are tuned.
    pub targets: Targets,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warm-up.
    pub lr_schedule: LrSchedule,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// AdamW's other settings.
    pub adamw: AdamWConfig,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Instance examples per micro-batch (as many class examples join them under prior
    /// preservation).
    pub batch_size: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Seed of everything random: initialisation, data order, flips, crops, timesteps, noise.
    pub seed: u64,
    /// Write a checkpoint every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Sample a prompt now and then.
    pub validation: Option<ValidationConfig>,
    /// The output folder.
    pub out: PathBuf,
    /// The dynamic loss scale of f16 models (others train unscaled).
    pub loss_scale: LossScaleConfig,
    /// Min-SNR, offset noise, caption dropout.
    pub recipe: crate::Recipe,
}

/// `text` with `{token}` and `{class}` filled in.
pub fn fill(text: &str, token: &str, class_word: &str) -> String {
    text.replace("{token}", token)
        .replace("{class}", class_word)
}

impl TrainConfig {
    /// `text` with this run's `{token}` and `{class}` filled in.
    pub fn fill(&self, text: &str) -> String {
        fill(text, &self.token, &self.class_word)
    }

    /// The instance prompt with `{token}` and `{class}` filled in.
    pub fn instance_text(&self) -> String {
        self.fill(&self.instance_prompt)
    }

    /// The run's options as `metrics.jsonl`'s first line records them (`{"run": ...}`).
    pub fn record(&self, base_model: &str) -> serde_json::Value {
        let mut run = serde_json::json!({
            "base_model": base_model,
            "method": self.adapter.method.to_string(),
            "targets": self.targets.to_string(),
            "instance_prompt": self.instance_text(),
            "resolution": self.resolution,
            "lr": self.lr,
            "lr_schedule": self.lr_schedule.to_string(),
            "warmup_steps": self.warmup_steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "flip": self.flip,
            "center_crop": self.center_crop,
            "prior_preservation": self.prior.is_some(),
        });
        for (k, v) in self.recipe.entries() {
            run[k] = serde_json::Value::String(v);
        }
        serde_json::json!({ "run": run })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.max_steps == 0 {
            return bad("--max-steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.repeats == 0 {
            return bad("--batch-size, --grad-accum and --repeats must be at least 1".into());
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr {} must be a finite number >= 0", self.lr));
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad(format!(
                "--resolution {} must be a positive multiple of 8",
                self.resolution
            ));
        }
        if self.recipe.aspect_buckets && self.resolution < crate::buckets::STEP {
            return bad(format!(
                "--aspect-buckets needs --resolution {} or more (bucket sides are multiples of it)",
                crate::buckets::STEP
            ));
        }
        if self.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return bad("--max-grad-norm must be > 0".into());
        }
        if self.token.trim().is_empty() {
            return bad("--token must not be empty".into());
        }
        if let Some(p) = &self.prior {
            if p.num_class_images == 0 {
                return bad("--num-class-images must be at least 1 with prior preservation".into());
            }
        }
        if self.validation.as_ref().is_some_and(|v| v.every == 0) {
            return bad("--validation-every must be at least 1".into());
        }
        self.adapter.validate()?;
        self.recipe.validate()?;
        Ok(())
    }

    /// What must match for a checkpoint to be resumed: everything that changes the numbers of the
    /// steps already taken (`--max-steps` may grow: a resumed run follows the new schedule).
    pub fn fingerprint(&self) -> String {
        format!(
            "{:?}|{}|{}|{}|{}|{}|{}|{}|{:?}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{}|{}",
            self.adapter,
            self.targets,
            self.instance_text(),
            self.resolution,
            self.center_crop,
            self.flip,
            self.repeats,
            self.lr,
            self.lr_schedule,
            self.adamw,
            self.grad_accum,
            self.warmup_steps,
            self.max_grad_norm,
            self.batch_size,
            self.seed,
            self.prior
                .as_ref()
                .map(|p| (&p.class_prompt, p.num_class_images, p.weight)),
            self.token,
            self.class_word,
        ) + &if self.recipe.is_default() {
            // runs without recipe options keep the fingerprint they had before they existed
            String::new()
        } else {
            format!("|{:?}", self.recipe)
        }
    }
}
