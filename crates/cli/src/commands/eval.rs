//! `atomtune eval`: DINO, CLIP-I and CLIP-T of a folder of generated images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use eval::preprocess::load_rgb;
use eval::{Evaluator, Scores};
use sample::png_io::read_png;
use sample::Infotext;
use serde_json::json;

use crate::cli::EvalArgs;

/// `prompt` without the whole word `token` (any case), spaces collapsed.
pub fn drop_token(prompt: &str, token: &str) -> String {
    prompt
        .split_whitespace()
        .filter(|w| {
            let bare = w.trim_matches(|c: char| !c.is_alphanumeric() && c != '<' && c != '>');
            token.is_empty() || !bare.eq_ignore_ascii_case(token)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The generated images' prompts: from `--prompts`, or each PNG's `parameters` text.
fn prompts(files: &[PathBuf], from: Option<&Path>) -> Result<Vec<String>> {
    if let Some(path) = from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompts {}", path.display()))?;
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if lines.len() != files.len() {
            bail!(
                "--prompts {}: {} prompts for {} generated images (one line per image, in file-name order)",
                path.display(),
                lines.len(),
                files.len()
            );
        }
        return Ok(lines);
    }
    files
        .iter()
        .map(|f| {
            let png = read_png(f).ok().and_then(|p| p.parameters);
            match png {
                Some(text) => Ok(Infotext::parse(&text).prompt),
                None => bail!(
                    "{}: no generation parameters in the file (not a PNG from `atomtune sample`?); give the prompts with --prompts FILE",
                    f.display()
                ),
            }
        })
        .collect()
}

fn images(dir: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = train::dataset::image_files(dir)
        .with_context(|| format!("reading {what} {}", dir.display()))?
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("grid-"))
        })
        .collect();
    if files.is_empty() {
        bail!("{what} {}: no images there", dir.display());
    }
    Ok(files)
}

/// Runs `atomtune eval`.
pub fn run(a: &EvalArgs) -> Result<ExitCode> {
    let generated = images(&a.images, "--images")?;
    let reference = images(&a.reference, "--reference")?;
    let texts: Vec<String> = prompts(&generated, a.prompts.as_deref())?
        .iter()
        .map(|p| drop_token(p, &a.token))
        .collect();
    let device = crate::device::device(a.device)?;
    let ev = Evaluator::load(&a.dino, &a.clip, &device)
        .with_context(|| format!("loading the models (--dino {}, --clip {})", a.dino, a.clip))?;
    let load =
        |files: &[PathBuf]| -> Result<Vec<_>> { files.iter().map(|f| Ok(load_rgb(f)?)).collect() };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let scores = ev.evaluate(&load(&generated)?, &refs, &load(&reference)?)?;
    print_table(&generated, &texts, &scores);
    println!(
        "{} generated images against {} photos of {}",
        generated.len(),
        reference.len(),
        a.reference.display()
    );
    if let Some(path) = &a.json {
        let per_image: Vec<_> = generated
            .iter()
            .zip(&texts)
            .zip(&scores.per_image)
            .map(|((f, t), s)| {
                json!({"file": f.display().to_string(), "prompt": t, "dino": s.dino, "clip_i": s.clip_i, "clip_t": s.clip_t})
            })
            .collect();
        let v = json!({
            "dino": scores.dino, "clip_i": scores.clip_i, "clip_t": scores.clip_t,
            "images": generated.len(), "reference_images": reference.len(),
            "dino_model": a.dino, "clip_model": a.clip, "token": a.token,
            "per_image": per_image,
        });
        atoms::io::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())
            .with_context(|| format!("writing --json {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(files: &[PathBuf], texts: &[String], s: &Scores) {
    println!(
        "{:<28} {:>7} {:>7} {:>7}  prompt (CLIP-T)",
        "image", "DINO", "CLIP-I", "CLIP-T"
    );
    for ((f, t), x) in files.iter().zip(texts).zip(&s.per_image) {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        println!(
            "{name:<28} {:>7.4} {:>7.4} {:>7.4}  {t}",
            x.dino, x.clip_i, x.clip_t
        );
    }
    println!(
        "{:<28} {:>7.4} {:>7.4} {:>7.4}",
        "mean", s.dino, s.clip_i, s.clip_t
    );
}

#[cfg(test)]
mod tests {
    use super::drop_token;

    #[test]
    fn the_trigger_word_is_dropped_whole() {
        assert_eq!(drop_token("a photo of sks dog", "sks"), "a photo of dog");
        assert_eq!(drop_token("a SKS dog, sks.", "sks"), "a dog,");
        assert_eq!(drop_token("a <sks> dog", "<sks>"), "a dog");
        // not inside other words
        assert_eq!(drop_token("asks skster sks", "sks"), "asks skster");
    }
}
