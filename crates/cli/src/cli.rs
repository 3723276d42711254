//! Command-line flags (clap derive). These types stay in the binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::{DTypeArg, DeviceArg};

/// Personalize Stable Diffusion from a few photos by tuning filter atoms, and share the result as
/// a delta file of kilobytes.
#[derive(Debug, Parser)]
#[command(name = "atomtune", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `--gradient-checkpointing` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointArg {
    /// The blocks whose activations are largest for their recompute.
    Selective,
    /// Every resnet and transformer block.
    All,
}

impl From<CheckpointArg> for models::Checkpointing {
    fn from(a: CheckpointArg) -> Self {
        match a {
            CheckpointArg::Selective => models::Checkpointing::Selective,
            CheckpointArg::All => models::Checkpointing::All,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Teach the model a subject from a folder of photos; writes a small delta file.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Generate images from prompts with a base model and any number of deltas; PNGs carry
    /// their generation parameters.
    Sample(Box<SampleArgs>),
    /// Describe a delta file: method, layers, parameters, base model, trigger; and with --base,
    /// whether it fits that base model.
    Inspect(InspectArgs),
    /// Write the base model with deltas baked in: a diffusers folder, or a single-file checkpoint
    /// (A1111 / ComfyUI layout) when --out ends in .safetensors.
    Merge(Box<MergeArgs>),
    /// Write a delta as an adapter file A1111 and ComfyUI load with their stock loaders: the
    /// exact weight change (`diff`) or a LoCon of it (`locon`, kohya / LyCORIS names).
    Export(Box<ExportArgs>),
    /// Measure generated images the way the DreamBooth paper does: subject fidelity (DINO,
    /// CLIP-I) against the subject's real photos, prompt fidelity (CLIP-T).
    Eval(EvalArgs),
}

/// `atomtune merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model. Its --dtype is the dtype written (auto: f16, as checkpoints are shared);
    /// the deltas are applied in f32.
    #[command(flatten)]
    pub model: ModelArgs,

    /// A delta to bake in, with an optional weight (default 1); repeat to stack deltas. Without
    /// one, the model is written as it is: a folder to a single file, or to another dtype.
    #[arg(long = "delta", value_name = "PATH[:WEIGHT]")]
    pub deltas: Vec<DeltaArg>,

    /// Refuse deltas trained on a different base checkpoint (instead of a warning).
    #[arg(long)]
    pub strict: bool,

    /// A folder to write a diffusers pipeline into, or a `.safetensors` single file.
    #[arg(long)]
    pub out: PathBuf,
}

/// `atomtune export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The base model the delta applies to (its weights make the change).
    #[command(flatten)]
    pub model: ModelArgs,

    /// The delta, `PATH[:WEIGHT]` (or a hub repo, `owner/name[:FILE.safetensors][:WEIGHT]`).
    #[arg(long)]
    pub delta: DeltaArg,

    /// `diff`: each layer's exact change (as large as the layers); `locon`: a low-rank
    /// approximation (truncated SVD of each change).
    #[arg(long, value_enum, default_value_t = ExportFormat::Locon)]
    pub format: ExportFormat,

    /// LoCon rank of every layer (default: per layer, the smallest within --max-error).
    #[arg(long)]
    pub rank: Option<usize>,

    /// LoCon: the largest relative error (Frobenius) a layer may keep when its rank is chosen.
    #[arg(long, default_value_t = 0.01)]
    pub max_error: f64,

    /// The adapter file to write (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// `--format` of `atomtune export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The exact weight change, LyCORIS "full" (`<module>.diff`).
    Diff,
    /// LoCon (`lora_down`, `lora_up`, `alpha`).
    Locon,
}

/// `atomtune eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Folder of generated images (png, jpg, ...; `grid-*` files of `sample --grid` are left out).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,

    /// Folder of the subject's real photos.
    #[arg(long, value_name = "DIR")]
    pub reference: PathBuf,

    /// One prompt per generated image, one per line, in file-name order (default: each PNG's
    /// `parameters` text, as `atomtune sample` writes it).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// The trigger token, dropped from each prompt for CLIP-T as the DreamBooth protocol does
    /// ("a photo of sks dog" is scored against "a photo of dog").
    #[arg(long, default_value = "sks")]
    pub token: String,

    /// DINO model: hub id or local folder (a transformers ViTModel).
    #[arg(long, default_value = eval::DEFAULT_DINO)]
    pub dino: String,

    /// CLIP model: hub id or local folder (a transformers CLIPModel).
    #[arg(long, default_value = eval::DEFAULT_CLIP)]
    pub clip: String,

    /// Also write the means and per-image values as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

/// Which model to load, and where to run it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face Hub repo id, a local diffusers folder, a single-file checkpoint
    /// (`.safetensors` in the A1111 / ComfyUI layout), or a random-weight preset (sd15-random,
    /// sd21-random, sd21-base-random, sdxl-random).
    #[arg(long, default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5")]
    pub model: String,

    /// Load `*.<VARIANT>.safetensors` weights (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,

    /// For a single-file --model: the diffusers folder or hub repo whose configs and tokenizers
    /// to use (default: the public ones of SD 1.5, SD 2.1 or SDXL base, as the file's keys show).
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub model_config: Option<String>,

    /// What the model predicts, overriding its scheduler config. A single file cannot say:
    /// SD 2.x files default to v-prediction (SD 2.1 at 768), SD 1.x and SDXL to epsilon.
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionArg>,

    /// Hub revision: branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,

    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,

    /// Number format of the weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,

    /// On CUDA, run f32 matrix products in full f32 instead of on TF32 tensor cores (TF32 keeps
    /// f32's range with a 10-bit mantissa per product; f32 models and attention use it).
    #[arg(long)]
    pub exact_f32: bool,
}

/// `--optimizer` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerArg {
    /// AdamW at --lr.
    Adamw,
    /// Prodigy: the step size estimated, --lr its multiplier (default 1).
    Prodigy,
}

impl From<OptimizerArg> for train::OptimizerKind {
    fn from(a: OptimizerArg) -> Self {
        match a {
            OptimizerArg::Adamw => train::OptimizerKind::AdamW,
            OptimizerArg::Prodigy => train::OptimizerKind::Prodigy,
        }
    }
}

/// `--prediction-type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    /// The noise (SD 1.x, SD 2.x-base, SDXL).
    Epsilon,
    /// The velocity `v` (SD 2.x at 768).
    VPrediction,
}

impl PredictionArg {
    /// The scheduler config's spelling.
    pub fn config_name(self) -> &'static str {
        match self {
            PredictionArg::Epsilon => "epsilon",
            PredictionArg::VPrediction => "v_prediction",
        }
    }
}

impl ModelArgs {
    /// The flags that name this model (`--model` and, where given, its config, variant,
    /// revision and prediction type) as a shell command line: what a printed hint repeats.
    pub fn flags(&self) -> String {
        let mut out = format!("--model {}", crate::format::shell_word(&self.model));
        let named = [
            ("--model-config", self.model_config.clone()),
            ("--variant", self.variant.clone()),
            ("--revision", self.revision.clone()),
            (
                "--prediction-type",
                self.prediction_type
                    .and_then(|p| clap::ValueEnum::to_possible_value(&p))
                    .map(|v| v.get_name().to_string()),
            ),
        ];
        for (flag, value) in named {
            if let Some(v) = value {
                out.push_str(&format!(" {flag} {}", crate::format::shell_word(&v)));
            }
        }
        out
    }

    /// How to load the model on `device` in `dtype`, every weight as stored.
    pub fn load_options(
        &self,
        dtype: candle_core::DType,
        device: candle_core::Device,
    ) -> models::LoadOptions {
        models::LoadOptions {
            dtype,
            device,
            variant: self.variant.clone(),
            revision: self.revision.clone(),
            seed: 0,
            model_config: self.model_config.clone(),
            prediction_type: self.prediction_type.map(|p| p.config_name().to_string()),
            bf16_weights: false,
        }
    }

    /// How to load a model that never runs but whose adapted layers' weights are taken
    /// (`merge`, `export`): f32 on the CPU, conv and linear weights kept in bf16 meanwhile (half
    /// their memory); `models::Layers::base_weight` reads each one's f32 original again, so what
    /// is computed from them is exact.
    pub fn base_options(&self) -> models::LoadOptions {
        models::LoadOptions {
            bf16_weights: true,
            ..self.load_options(candle_core::DType::F32, candle_core::Device::Cpu)
        }
    }

    /// [`ModelArgs::load_options`] for a model that computes (`train`, `sample`): under bf16's
    /// mixed precision on the CPU (`device_and_dtype` turned it on), conv and linear weights are
    /// kept in bf16 too (half their memory; the products round them to bf16 anyway).
    pub fn compute_options(
        &self,
        dtype: candle_core::DType,
        device: candle_core::Device,
    ) -> models::LoadOptions {
        let bf16_weights =
            device.is_cpu() && dtype == candle_core::DType::F32 && models::cpu_bf16::active();
        models::LoadOptions {
            bf16_weights,
            ..self.load_options(dtype, device)
        }
    }
}

/// A delta and its weight, `PATH[:WEIGHT]`.
#[derive(Debug, Clone)]
pub struct DeltaArg {
    pub path: PathBuf,
    pub weight: f64,
}

impl DeltaArg {
    /// The local file: the path itself when it exists, else a hub repo's file
    /// (`owner/name[:FILE.safetensors]`, fetched into or read from the Hugging Face cache).
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        use anyhow::Context;
        if self.path.exists() {
            return Ok(self.path.clone());
        }
        let text = self.path.to_string_lossy();
        let (repo, file) = match text.split_once(':') {
            Some((r, f)) => (r, Some(f)),
            None => (text.as_ref(), None),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| ok(p)) {
            anyhow::bail!(
                "--delta {text}: no such file, and not a hub repo (owner/name[:FILE.safetensors])"
            );
        }
        models::hub::fetch_file(repo, file, None)
            .with_context(|| format!("fetching --delta {text} from the hub"))
    }

    /// Reads every `--delta` (an atomtune delta, or a kohya / LyCORIS LoRA, LoCon or diff
    /// file; local or on the hub), with its weight; errors name the file.
    pub fn read_all(args: &[DeltaArg]) -> anyhow::Result<Vec<(atoms::kohya::AnyDelta, f64)>> {
        use anyhow::Context;
        args.iter()
            .map(|d| {
                let path = d.resolve()?;
                let delta = atoms::kohya::AnyDelta::read(&path)
                    .with_context(|| format!("reading --delta {}", path.display()))?;
                Ok((delta, d.weight))
            })
            .collect()
    }
}

impl std::str::FromStr for DeltaArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((p, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                if !weight.is_finite() {
                    return Err(format!("delta weight `{w}` is not a finite number"));
                }
                return Ok(DeltaArg {
                    path: p.into(),
                    weight,
                });
            }
        }
        Ok(DeltaArg {
            path: s.into(),
            weight: 1.0,
        })
    }
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,

    /// A file of prompts, one per line (blank lines and lines starting with # are skipped).
    /// `{token}` and `{class}` are replaced by --token and --class, or by the delta's trigger.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// The trigger token for `{token}` in prompts (default: the first atomtune delta's).
    #[arg(long)]
    pub token: Option<String>,

    /// The class word for `{class}` in prompts (default: the first atomtune delta's).
    #[arg(long = "class")]
    pub class_word: Option<String>,

    /// What to steer away from. Without it SD 1.x/2.x use the empty text and SDXL zero
    /// unconditional embeddings (as diffusers); `--negative-prompt ""` encodes the empty text.
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,

    /// Classifier-free guidance scale (<= 1 skips the unconditional pass).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,

    /// The sampler (default: the one in the model's scheduler config).
    #[arg(long, value_parser = ["ddim", "ddpm", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"])]
    pub scheduler: Option<String>,

    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,

    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,

    /// Images per prompt; image i uses seed + i, so any one can be made again alone.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Seed (default: a random one, written into every PNG).
    #[arg(long)]
    pub seed: Option<u64>,

    /// A .safetensors file with the initial latents [1, 4, h/8, w/8] (multiplied by the
    /// scheduler's initial noise sigma, like diffusers' `latents=`).
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,

    /// A delta to apply, with an optional weight (default 1); repeat to stack deltas. An
    /// atomtune delta or a kohya / LyCORIS LoRA, LoCon or diff file; a local path or a hub repo,
    /// `owner/name[:FILE.safetensors]`.
    #[arg(long = "delta", value_name = "PATH|REPO[:WEIGHT]")]
    pub deltas: Vec<DeltaArg>,

    /// Refuse deltas trained on a different base checkpoint (instead of a warning).
    #[arg(long)]
    pub strict: bool,

    /// Output folder.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,

    /// Also save all images of the run as one grid PNG.
    #[arg(long)]
    pub grid: bool,

    /// Keep the frozen weights packed for the CPU's bf16 products between steps, for products
    /// of at most 512 rows: faster steps for memory (SDXL at 512x512: its CFG step 12-18%
    /// faster at 9.3 GB instead of 5.3 GB on a Zen 5; at 1024x1024 no product is that small).
    #[arg(long)]
    pub keep_packed_weights: bool,

    /// No progress bars or log lines (warnings and errors still print).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The delta file (.safetensors).
    pub delta: PathBuf,

    /// A base model to check the delta against: a diffusers folder (its unet/ is read) or a UNet
    /// .safetensors file with diffusers key names.
    #[arg(long, value_name = "MODEL_DIR")]
    pub base: Option<PathBuf>,

    /// With --base: a base whose weights differ from the training base (a derived checkpoint)
    /// does not fit, instead of fitting with a warning.
    #[arg(long, requires = "base")]
    pub strict: bool,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A TOML file of flags (`max_steps = 400`, ...; every flag of train is a key); flags given
    /// here override it. Each run writes its whole configuration to OUT/config.toml, so
    /// `--config OUT/config.toml` repeats it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// The run's effective configuration as TOML (filled in by main, written to OUT/config.toml).
    #[arg(skip)]
    pub effective_config: String,

    /// The folder of subject photos (3-10 are typical). `name.txt` beside `name.jpg` is that
    /// image's caption.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,

    /// A rare token that will name the subject in prompts.
    #[arg(long, default_value = "sks")]
    pub token: String,

    /// The subject's class word (dog, backpack, toy...).
    #[arg(long = "class", value_name = "CLASS")]
    pub class_word: String,

    /// Output folder: delta.safetensors, metrics.jsonl, checkpoints/, samples/, loss.png.
    #[arg(long)]
    pub out: PathBuf,

    /// The prompt of images without a caption file.
    #[arg(long, default_value = "a photo of {token} {class}")]
    pub instance_prompt: String,

    /// Training resolution in pixels (default: the model's native size, 512 for SD 1.5).
    #[arg(long)]
    pub resolution: Option<usize>,

    /// How images are cut to a square after resizing.
    #[arg(long, value_parser = ["center", "random"], default_value = "center")]
    pub crop: String,

    /// Mirror images at random.
    #[arg(long)]
    pub flip: bool,

    /// Each image appears this many times per epoch.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,

    /// Skip files that are not readable images (with a warning) instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,

    /// Prior preservation: a folder of class images (missing ones are generated there).
    #[arg(long, value_name = "DIR")]
    pub class_images: Option<PathBuf>,

    /// The prompt of class images.
    #[arg(long, default_value = "a photo of {class}")]
    pub class_prompt: String,

    /// How many class images prior preservation uses.
    #[arg(long, default_value_t = 100)]
    pub num_class_images: usize,

    /// Weight of the class loss.
    #[arg(long, default_value_t = 1.0)]
    pub prior_weight: f64,

    /// Min-SNR loss weighting (Hang et al. 2023) with this gamma (5 is usual): each example's
    /// loss times min(SNR, gamma)/SNR (v-prediction: /(SNR+1)), so easy high-SNR timesteps
    /// count less.
    #[arg(long, value_name = "GAMMA")]
    pub min_snr_gamma: Option<f64>,

    /// Offset noise: add this times a per-channel constant to each example's noise (0.05-0.1
    /// is usual); helps very dark or bright images.
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,

    /// Replace each example's caption by the empty text with this probability.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub caption_dropout: f64,

    /// Write the exponential moving average of the tuned parameters (this decay, 0.999 is
    /// usual) as the delta; checkpoints keep the raw parameters too, so resume stays exact.
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,

    /// Count the loss only where each photo's mask says: `name.mask.png` beside `name.jpg`
    /// (white = learn), or else the photo's alpha channel; the mean over the mask on the latent
    /// grid. Photos without a mask count everywhere.
    #[arg(long)]
    pub masked_loss: bool,

    /// Keep each photo's aspect ratio: it goes to the bucket (sides multiples of 64, area about
    /// --resolution^2, at most 4:1) nearest its shape that it covers, so it is never upscaled;
    /// batches come from one bucket. The buckets and their counts are printed at the start.
    #[arg(long)]
    pub aspect_buckets: bool,

    /// Pivotal tuning: --token becomes a new token of every tokenizer with its own embedding
    /// (one row per text encoder, started at --class's), trained with the adapters and stored in
    /// the delta (768 numbers for SD 1.5, 2048 for SDXL); `atomtune sample` uses it whenever
    /// the delta is loaded. The token may then be a new word such as `<sks>`.
    #[arg(long)]
    pub train_token_embedding: bool,

    /// Learning rate of the token embedding (default 5e-4, textual inversion's usual range; 1
    /// with --optimizer prodigy).
    #[arg(long, requires = "train_token_embedding")]
    pub embedding_lr: Option<f64>,

    /// The optimizer. `prodigy` (Mishchenko & Defazio 2023) estimates the step size itself:
    /// --lr then multiplies its estimate and defaults to 1; it takes --adam-beta1/2 and
    /// --weight-decay like AdamW.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,

    /// Sampling steps for generated class images.
    #[arg(long, default_value_t = 25)]
    pub class_sample_steps: usize,

    /// What is tuned.
    #[arg(long, value_parser = ["atoms", "atoms-rec", "lora", "full"], default_value = "atoms")]
    pub method: String,

    /// Which layers (default: conv for atoms, atoms-rec and full; attn for lora).
    #[arg(long, value_parser = ["conv", "conv3x3", "attn", "all"])]
    pub targets: Option<String>,

    /// Atoms per layer m (default: the filter size d, an exact dictionary).
    #[arg(long)]
    pub atoms: Option<usize>,

    /// Sub-atoms per atom m1 (atoms-rec).
    #[arg(long, default_value_t = 3)]
    pub sub_atoms: usize,

    /// How atoms are computed.
    #[arg(long, value_parser = ["svd", "lasso"], default_value = "svd")]
    pub dictionary: String,

    /// L1 weight of the lasso dictionary.
    #[arg(long, default_value_t = 1e-3)]
    pub lasso_lambda: f64,

    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,

    /// LoRA alpha (default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,

    /// Channel block of linear layers for atoms methods, ROWSxCOLS.
    #[arg(long, default_value = "4x4")]
    pub block: String,

    /// Peak learning rate (default: per method, from the sweep in README.md; 1 with
    /// --optimizer prodigy).
    #[arg(long)]
    pub lr: Option<f64>,

    /// Learning-rate schedule after warm-up.
    #[arg(long, value_parser = ["constant", "linear", "cosine"], default_value = "constant")]
    pub lr_schedule: String,

    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,

    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,

    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,

    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,

    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,

    /// Clip the global gradient norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,

    /// Subject images per micro-batch (as many class images join them with prior preservation).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// Keep only some UNet blocks' inputs during the forward and run those blocks again in the
    /// backward (every device). `selective` (the flag alone): the full-resolution level's
    /// blocks and the next level's transformers, where activations are largest for the work of
    /// recomputing them (SD 1.5 at 512x512: 4.7 GB instead of 6.7, about 20% slower);
    /// `all`: every resnet and transformer block (4.1 GB, about 40% slower). On a CPU with
    /// bf16 products it also packs frozen weights at every product instead of keeping them
    /// packed (`ATOMTUNE_KEEP_PACKED=1` keeps them).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "selective"
    )]
    pub gradient_checkpointing: Option<CheckpointArg>,

    /// Optimizer steps.
    #[arg(long, default_value_t = 400)]
    pub max_steps: usize,

    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Write a checkpoint every N steps.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,

    /// Continue from a checkpoint folder, or `latest` (the newest under OUT/checkpoints).
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<String>,

    /// A prompt sampled every --validation-every steps and at the end, into OUT/samples.
    #[arg(long)]
    pub validation_prompt: Option<String>,

    /// Steps between validation samples [default: 100]; needs --validation-prompt.
    #[arg(long)]
    pub validation_every: Option<usize>,

    /// Sampling steps of validation images [default: 20]; needs --validation-prompt.
    #[arg(long)]
    pub validation_steps: Option<usize>,

    /// Validation images each time [default: 1]; needs --validation-prompt.
    #[arg(long)]
    pub num_validation_images: Option<usize>,

    /// No progress bars or log lines (warnings and errors still print).
    #[arg(long)]
    pub quiet: bool,
}
