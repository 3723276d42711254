//! Command-line flags (clap derive). These types stay in the binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Describe a delta file: method, layers, parameters, base model, trigger; and with --base,
    /// whether it fits that base model.
    Inspect(InspectArgs),
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
