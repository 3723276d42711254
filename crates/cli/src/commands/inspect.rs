//! `atomtune inspect`: what a delta file holds, and whether it fits a base model.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use atoms::delta::FORMAT_VERSION;
use atoms::{Delta, DictionaryKind, Method};
use serde_json::json;

use crate::base_model::open_unet;
use crate::cli::InspectArgs;
use crate::format::{bytes, thousands};

/// How the delta fits the base given with `--base`.
enum Fit {
    /// It fits; these layers' base weights differ from the training base.
    Fits {
        differing: Vec<String>,
        warning: Option<String>,
    },
    /// It does not fit, for this reason.
    DoesNotFit(String),
}

pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let path = &args.delta;
    let delta = match Delta::read(path) {
        Err(atoms::Error::NotADelta { .. }) => return inspect_adapter(args),
        d => d.with_context(|| format!("reading delta {}", path.display()))?,
    };
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading delta {}", path.display()))?
        .len();
    let fit = match &args.base {
        None => None,
        Some(model) => {
            let base = open_unet(model)?;
            Some(match delta.check_base(&base, args.strict) {
                Ok(f) => Fit::Fits {
                    warning: f.warning(&delta),
                    differing: f.differing_layers,
                },
                Err(e) => Fit::DoesNotFit(e.to_string()),
            })
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&to_json(&delta, path, size, &fit))?
        )?;
    } else {
        write_text(&mut out, &delta, path, size, &fit)?;
    }
    Ok(match fit {
        Some(Fit::DoesNotFit(_)) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// The method with its hyper-parameters, as a user would say it.
fn describe_method(delta: &Delta) -> String {
    let c = &delta.meta().config;
    let m = match c.atoms {
        Some(m) => format!("m = {m}"),
        None => "m = d".to_string(),
    };
    let dict = match c.dictionary {
        DictionaryKind::Svd => "svd atoms".to_string(),
        DictionaryKind::Lasso(o) => format!("lasso atoms, lambda {}", o.lambda),
    };
    match c.method {
        Method::Atoms => format!("atoms ({dict}, {m})"),
        Method::AtomsRec => format!("atoms-rec ({dict}, {m}, m1 = {})", c.sub_atoms),
        Method::Lora => format!("lora (rank {}, alpha {})", c.rank, c.lora_alpha),
        Method::Full => "full".to_string(),
    }
}

/// How many layers, grouped by filter size (atoms) or by conv/linear (lora, full).
fn describe_layers(delta: &Delta) -> String {
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for tensors in delta.layers().values() {
        let key = match delta.method() {
            Method::Atoms | Method::AtomsRec => {
                let d = tensors["atoms"].dims()[1];
                format!("d = {d:>3}")
            }
            Method::Lora | Method::Full => {
                let t = tensors
                    .get("lora_down")
                    .or(tensors.get("diff"))
                    .expect("checked on read");
                if t.rank() == 4 { "conv" } else { "linear" }.to_string()
            }
        };
        *groups.entry(key).or_default() += 1;
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(k, n)| format!("{n} with {k}"))
        .collect();
    format!("{} ({})", delta.layers().len(), parts.join(", "))
}

/// A kohya / LyCORIS adapter file (what `atomtune export` writes, or a community LoRA): its
/// kinds of modules, its base model version and trigger, and with --base how many of its modules
/// name a layer of that UNet.
fn inspect_adapter(args: &InspectArgs) -> Result<ExitCode> {
    let path = &args.delta;
    let file = atoms::kohya::AdapterFile::read(path)
        .with_context(|| format!("reading {}", path.display()))?;
    if file.modules.is_empty() {
        anyhow::bail!(
            "{}: neither an atomtune delta nor a kohya / LyCORIS adapter file (no `<module>.diff` or `<module>.lora_down.weight` keys)",
            path.display()
        );
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for m in file.modules.values() {
        *kinds.entry(m.kind()).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let m = |k: &str| file.metadata.get(k).cloned().unwrap_or_else(|| "-".into());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "adapter      {} (kohya / LyCORIS layout, not an atomtune delta)",
        path.display()
    )?;
    writeln!(
        out,
        "modules      {} ({})",
        file.modules.len(),
        kinds.join(", ")
    )?;
    writeln!(out, "base version {}", m("ss_base_model_version"))?;
    writeln!(out, "trigger      {}", m("modelspec.trigger_phrase"))?;
    for (name, vectors) in &file.embeddings {
        let parts: Vec<String> = vectors
            .iter()
            .map(|(k, t)| format!("{k} {:?}", t.dims()))
            .collect();
        writeln!(out, "embedding    {name:?} bundled: {}", parts.join(", "))?;
    }
    if let Some(e) = file.metadata.get("atomtune.relative_error") {
        writeln!(out, "made by      atomtune export (relative error {e})")?;
    }
    if let Some(model) = &args.base {
        let base = open_unet(model)?;
        let names: std::collections::HashSet<String> = base
            .layers()
            .iter()
            .map(|l| atoms::export::module_name(l))
            .collect();
        let matched = file.modules.keys().filter(|k| names.contains(*k)).count();
        writeln!(
            out,
            "matches base {matched} of {} modules name a UNet layer of {}",
            file.modules.len(),
            model.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_text(
    out: &mut impl Write,
    delta: &Delta,
    path: &std::path::Path,
    size: u64,
    fit: &Option<Fit>,
) -> Result<()> {
    let meta = delta.meta();
    writeln!(out, "delta        {} ({})", path.display(), bytes(size))?;
    writeln!(out, "format       atomtune.delta v{FORMAT_VERSION}")?;
    writeln!(out, "method       {}", describe_method(delta))?;
    writeln!(out, "layers       {}", describe_layers(delta))?;
    writeln!(
        out,
        "parameters   {} trainable",
        thousands(delta.num_params())
    )?;
    let family = meta
        .base_architecture
        .as_deref()
        .map(|a| match models::Architecture::from_name(a) {
            Some(arch) => format!("{arch}, "),
            None => format!("{a}, "),
        })
        .unwrap_or_default();
    writeln!(
        out,
        "base         {} ({family}fingerprint {})",
        meta.base_model,
        meta.base_fingerprint()
    )?;
    if let Some(t) = &meta.trigger {
        let class = meta
            .class
            .as_deref()
            .map(|c| format!(" (class {c})"))
            .unwrap_or_default();
        writeln!(out, "trigger      {t}{class}")?;
    }
    if !delta.embeddings().is_empty() {
        writeln!(out, "embedding    {}", describe_embeddings(delta))?;
    }
    let mut trained = Vec::new();
    if let Some(s) = meta.steps {
        trained.push(format!("{} steps", thousands(s as usize)));
    }
    if let Some(s) = meta.seed {
        trained.push(format!("seed {s}"));
    }
    if let Some(t) = &meta.targets {
        trained.push(format!("targets {t}"));
    }
    if let Some(c) = &meta.created {
        trained.push(c.clone());
    }
    if !trained.is_empty() {
        writeln!(out, "trained      {}", trained.join(", "))?;
    }
    // the run's options, a column of their own (their names are longer than the labels)
    let width = meta.extra.keys().map(|k| k.len()).max().unwrap_or(0);
    for (i, (k, v)) in meta.extra.iter().enumerate() {
        let label = if i == 0 { "options" } else { "" };
        writeln!(out, "{label:<12} {k:<width$}  {v}")?;
    }
    match fit {
        None => {}
        Some(Fit::Fits { warning: None, .. }) => {
            writeln!(out, "fits base    yes (same base weights)")?
        }
        Some(Fit::Fits {
            warning: Some(w), ..
        }) => writeln!(out, "fits base    yes, with a warning: {w}")?,
        Some(Fit::DoesNotFit(why)) => writeln!(out, "fits base    no: {why}")?,
    }
    Ok(())
}

/// The trigger's learned embedding: its size and norm per text encoder.
fn describe_embeddings(delta: &Delta) -> String {
    let parts: Vec<String> = delta
        .embeddings()
        .iter()
        .map(|(enc, t)| {
            let norm = t
                .sqr()
                .and_then(|x| x.sum_all())
                .and_then(|x| x.to_scalar::<f32>())
                .map_or(f32::NAN, f32::sqrt);
            format!("{enc} [{}] (norm {norm:.3})", t.elem_count())
        })
        .collect();
    format!(
        "a new token {:?}, {}",
        delta.meta().trigger.as_deref().unwrap_or(""),
        parts.join(", ")
    )
}

fn to_json(
    delta: &Delta,
    path: &std::path::Path,
    size: u64,
    fit: &Option<Fit>,
) -> serde_json::Value {
    let meta = delta.meta();
    let layers: BTreeMap<&String, BTreeMap<&String, &[usize]>> = delta
        .layers()
        .iter()
        .map(|(name, t)| (name, t.iter().map(|(s, t)| (s, t.dims())).collect()))
        .collect();
    let fit = fit.as_ref().map(|f| match f {
        Fit::Fits { differing, warning } => json!({
            "fits": true, "same_base": differing.is_empty(),
            "differing_layers": differing, "warning": warning,
        }),
        Fit::DoesNotFit(why) => json!({ "fits": false, "reason": why }),
    });
    json!({
        "path": path.display().to_string(),
        "file_size": size,
        "format_version": FORMAT_VERSION,
        "method": delta.method().name(),
        "description": describe_method(delta),
        "parameters": delta.num_params(),
        "base_model": meta.base_model,
        "base_architecture": meta.base_architecture,
        "base_fingerprint": meta.base_fingerprint(),
        "trigger": meta.trigger,
        "class": meta.class,
        "steps": meta.steps,
        "seed": meta.seed,
        "created": meta.created,
        "num_layers": layers.len(),
        "layers": layers,
        "metadata": meta.to_metadata(),
        "base_fit": fit,
        "token_embedding": delta.embeddings().iter().map(|(k, t)| (k.clone(), t.elem_count())).collect::<BTreeMap<_, _>>(),
    })
}
