//! `atomtune export`: a delta as a kohya / LyCORIS adapter file for A1111 and ComfyUI.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use atoms::export::{export, metadata, Format};
use atoms::{Adapter, Delta};
use models::StableDiffusion;

use crate::cli::{ExportArgs, ExportFormat};
use crate::format::bytes;

/// Runs `atomtune export`.
pub fn run(a: &ExportArgs) -> Result<ExitCode> {
    if a.out.extension().is_none_or(|e| e != "safetensors") {
        bail!("--out {}: adapter files are .safetensors", a.out.display());
    }
    if !(0.0..1.0).contains(&a.max_error) {
        bail!("--max-error {}: a relative error in [0, 1)", a.max_error);
    }
    if a.rank == Some(0) {
        bail!("--rank 0: a LoCon needs rank 1 or more");
    }
    let path = &a.delta.resolve()?;
    let delta = Delta::read(path).with_context(|| format!("reading --delta {}", path.display()))?;
    // The change is computed in f32 on the CPU from each adapted layer's weight as stored:
    // exact up to f32.
    let sd = StableDiffusion::load(&a.model.model, &a.model.base_options())
        .with_context(|| format!("loading --model {}", a.model.model))?;
    let layers = sd.unet.layers();
    let fit = delta
        .check_base(layers, false)
        .context("checking --delta against --model")?;
    if let Some(w) = fit.warning(&delta) {
        eprintln!("warning: {w}");
    }
    let mut changes = Vec::new();
    for (name, adapter) in delta.adapters(layers)? {
        let base = layers.base_weight(&name)?;
        // detached: the change would otherwise hold its graph (W' and the base) alive
        let dw = adapter.delta_weight(&base, a.delta.weight)?.detach();
        changes.push((name, dw));
    }
    // the changes are all that is needed of the model from here
    drop(sd);
    let format = match a.format {
        ExportFormat::Diff => Format::Diff,
        ExportFormat::Locon => Format::Locon {
            rank: a.rank,
            max_error: a.max_error,
        },
    };
    let mut exported = export(&changes, format)?;
    exported.bundle_embeddings(&delta)?;
    let title = a
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta = metadata(delta.meta(), &exported, format, &title);
    let size = exported
        .write(&a.out, meta)
        .with_context(|| format!("writing --out {}", a.out.display()))?;
    if let Format::Locon { .. } = format {
        println!("{:<60} {:>5} {:>10}", "layer", "rank", "rel. error");
        for l in &exported.layers {
            let rank = l.rank.map_or("diff".to_string(), |r| r.to_string());
            println!("{:<60} {rank:>5} {:>10.2e}", l.layer, l.rel_error);
        }
    }
    println!(
        "wrote {} ({}, {} modules, {}; relative error overall {:.2e})",
        a.out.display(),
        bytes(size),
        exported.layers.len(),
        match a.format {
            ExportFormat::Diff => "exact diff",
            ExportFormat::Locon => "LoCon",
        },
        exported.overall_error()
    );
    Ok(ExitCode::SUCCESS)
}
