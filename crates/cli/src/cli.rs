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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from prompts with a base model and any number of deltas; PNGs carry
    /// their generation parameters.
    Sample(Box<SampleArgs>),
    /// Describe a delta file: method, layers, parameters, base model, trigger; and with --base,
    /// whether it fits that base model.
    Inspect(InspectArgs),
}

/// Which model to load, and where to run it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face Hub repo id, a local diffusers folder, or a random-weight preset
    /// (sd15-random, sd21-random, sd21-base-random).
    #[arg(long, default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5")]
    pub model: String,

    /// Load `*.<VARIANT>.safetensors` weights (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,

    /// Hub revision: branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,

    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,

    /// Number format of the weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
}

/// A delta and its weight, `PATH[:WEIGHT]`.
#[derive(Debug, Clone)]
pub struct DeltaArg {
    pub path: PathBuf,
    pub weight: f64,
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

    /// The trigger token for `{token}` in prompts (default: the first delta's).
    #[arg(long)]
    pub token: Option<String>,

    /// The class word for `{class}` in prompts (default: the first delta's).
    #[arg(long = "class")]
    pub class_word: Option<String>,

    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,

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

    /// A delta to apply, with an optional weight (default 1); repeat to stack deltas.
    #[arg(long = "delta", value_name = "PATH[:WEIGHT]")]
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
