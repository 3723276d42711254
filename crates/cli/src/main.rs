//! `atomtune`: personalize Stable Diffusion by tuning filter atoms.
//!
//! The binary is glue: it parses flags ([`cli`]), turns them into calls to the library crates, and
//! prints. Errors carry context naming the file or flag at fault and are printed as a chain.

mod base_model;
mod cli;
mod commands;
mod config_file;
mod device;
mod format;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    models::tune_process();
    let cmd = cli::Cli::command();
    // `train --config FILE` becomes the file's flags followed by the command line's.
    let argv = match config_file::expand(std::env::args_os().collect(), &cmd) {
        Ok(a) => a,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let matches = cmd
        .clone()
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| e.exit());
    let mut cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let cli::Command::Train(t) = &mut cli.command {
        t.effective_config = config_file::effective(&cmd, &matches);
    }
    // The model runs on one of the compute threads (models::on_compute_thread says why).
    match models::on_compute_thread(move || commands::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`atomtune inspect ... | head`) is not a failure.
            if let Some(io) = err.root_cause().downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
