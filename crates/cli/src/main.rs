//! `atomtune`: personalize Stable Diffusion by tuning filter atoms.
//!
//! The binary is glue: it parses flags ([`cli`]), turns them into calls to the library crates, and
//! prints. Errors carry context naming the file or flag at fault and are printed as a chain.

mod base_model;
mod cli;
mod commands;
mod device;
mod format;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    models::tune_process();
    let cli = cli::Cli::parse();
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
