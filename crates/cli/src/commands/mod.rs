//! One module per subcommand.

mod eval;
mod export;
mod inspect;
mod merge;
mod sample;
mod train;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the command the user asked for.
pub fn run(cli: Cli) -> Result<ExitCode> {
    // A wrong ATOMTUNE_KERNELS is refused before any work, with the values it takes.
    models::Kernels::from_env()?;
    match cli.command {
        Command::Eval(args) => eval::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Sample(args) => sample::run(&args),
        Command::Train(args) => train::run(&args),
    }
}
