//! `atomtune merge`: the base model with deltas baked in, as a diffusers folder or a single file.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use models::merge::{merge, Baked, MergeOutput, MergeSource};
use models::{ModelSpec, StableDiffusion};
use sample::pipeline::attach_deltas;

use crate::cli::{DeltaArg, MergeArgs};
use crate::device::DTypeArg;

/// Runs `atomtune merge`.
pub fn run(a: &MergeArgs) -> Result<ExitCode> {
    let opts = a.model.load_options(DType::F32, Device::Cpu);
    let source = match ModelSpec::parse(&a.model.model)? {
        ModelSpec::SingleFile(p) => MergeSource::SingleFile(p),
        ModelSpec::Local(p) => MergeSource::Folder(p),
        ModelSpec::Hub(repo) => MergeSource::Folder(
            models::hub::fetch_pipeline(&repo, &opts)
                .with_context(|| format!("fetching --model {repo}"))?,
        ),
        ModelSpec::Random(p) => bail!("--model {p}: a random preset has no files to merge into"),
    };
    if a.out.exists() && !a.out.is_dir() && a.out.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "--out {}: give a folder, or a file ending in .safetensors",
            a.out.display()
        );
    }
    if let ModelSpec::Local(dir) | ModelSpec::SingleFile(dir) = ModelSpec::parse(&a.model.model)? {
        let same = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        if same(&dir).is_some() && same(&dir) == same(&a.out) {
            bail!(
                "--out {} is the model itself: a merge reads it while writing, so write elsewhere",
                a.out.display()
            );
        }
    }
    let dtype = match a.model.dtype {
        DTypeArg::Auto | DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F32 => DType::F32,
    };
    let deltas = DeltaArg::read_all(&a.deltas)?;
    for (d, arg) in deltas.iter().zip(&a.deltas) {
        if let atoms::kohya::AnyDelta::Atomtune(d) = &d.0 {
            if !d.embeddings().is_empty() {
                bail!(
                    "--delta {}: it carries a learned token {:?} (--train-token-embedding), which a merged model cannot hold (its tokenizer has no such token); sample with --delta instead, or export it (A1111 reads the token from the exported file)",
                    arg.path.display(),
                    d.meta().trigger.as_deref().unwrap_or("")
                );
            }
        }
    }
    let single_out = a.out.extension().is_some_and(|e| e == "safetensors");
    let (sd, source) = match source {
        // a folder from a single file: its tensors as a folder holds them, read by the load
        MergeSource::SingleFile(p) if !single_out => {
            let (sd, folder) =
                StableDiffusion::load_single_file_as_folder(&p, &a.model.model, &opts)
                    .with_context(|| format!("loading --model {}", a.model.model))?;
            (sd, MergeSource::SingleFileAsFolder(folder))
        }
        // The files are read again to be written: the model is only where the adapted layers'
        // effective weights come from.
        source => {
            let sd = StableDiffusion::load(&a.model.model, &a.model.base_options())
                .with_context(|| format!("loading --model {}", a.model.model))?;
            (sd, source)
        }
    };
    for w in attach_deltas(&sd, &deltas, a.strict).context("applying --delta")? {
        eprintln!("warning: {w}");
    }
    let baked = Baked {
        unet: sd.unet.layers().effective_weights()?,
        text: sd
            .text
            .iter()
            .map(|e| e.model.layers().effective_weights())
            .collect::<models::Result<_>>()?,
    };
    let (family, unet) = (sd.architecture, sd.unet.config().clone());
    // the model is done with: its memory goes before the files are read again to be written
    drop(sd);
    merge(
        source,
        a.model.variant.as_deref(),
        &MergeOutput {
            family,
            unet: &unet,
            baked: &baked,
            out: &a.out,
            dtype,
        },
    )
    .with_context(|| format!("writing --out {}", a.out.display()))?;
    println!(
        "wrote {} ({} layers changed by {} delta(s), {dtype:?})",
        a.out.display(),
        baked.len(),
        deltas.len()
    );
    Ok(ExitCode::SUCCESS)
}
