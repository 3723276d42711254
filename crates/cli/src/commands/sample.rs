//! `atomtune sample`: prompts in, PNGs out (with their generation parameters inside).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use atoms::Delta;
use candle_core::Tensor;
use models::StableDiffusion;
use sample::pipeline::to_rgb8;
use sample::{apply_deltas, png_io, Infotext, Pipeline, Request, SchedulerKind};

use crate::cli::SampleArgs;
use crate::device::{describe, device_and_dtype, precision};
use crate::progress::Reporter;

/// The prompts of a run: `--prompt`, or the lines of `--prompts` with `{token}` and `{class}`
/// filled in.
fn prompts(args: &SampleArgs, first_delta: Option<&Delta>) -> Result<Vec<String>> {
    let raw: Vec<(usize, String)> = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![(0, p.clone())],
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading --prompts {}", file.display()))?;
            let lines: Vec<(usize, String)> = text
                .lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.trim().to_string()))
                .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
                .collect();
            if lines.is_empty() {
                bail!(
                    "--prompts {}: no prompts in the file (one per line)",
                    file.display()
                );
            }
            lines
        }
        (None, None) => bail!("give --prompt or --prompts"),
    };
    let token = args
        .token
        .clone()
        .or_else(|| first_delta.and_then(|d| d.meta().trigger.clone()));
    let class = args
        .class_word
        .clone()
        .or_else(|| first_delta.and_then(|d| d.meta().class.clone()));
    raw.into_iter()
        .map(|(line, p)| {
            let mut p = p;
            for (placeholder, value, flag) in [("{token}", &token, "--token"), ("{class}", &class, "--class")] {
                if p.contains(placeholder) {
                    let Some(v) = value else {
                        bail!(
                            "prompt{} uses {placeholder}: pass {flag}, or a --delta that records one",
                            if line > 0 { format!(" on line {line}") } else { String::new() }
                        );
                    };
                    p = p.replace(placeholder, v);
                }
            }
            Ok(p)
        })
        .collect()
}

/// The first free `NNNNN` index of `NNNNN-*.png` files in `dir`.
fn next_index(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits = name.split('-').next()?;
            (digits.len() == 5 && name.ends_with(".png")).then(|| digits.parse::<usize>().ok())?
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Lays images of one size out in a near-square grid.
fn grid(images: &[(usize, usize, Vec<u8>)]) -> (usize, usize, Vec<u8>) {
    let (w, h) = (images[0].0, images[0].1);
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    let rows = images.len().div_ceil(cols);
    let mut out = vec![0u8; cols * w * rows * h * 3];
    for (k, (_, _, px)) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..h {
            let dst = ((r * h + y) * cols * w + c * w) * 3;
            out[dst..dst + w * 3].copy_from_slice(&px[y * w * 3..(y + 1) * w * 3]);
        }
    }
    (cols * w, rows * h, out)
}

fn read_latents(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("reading --latents {}", path.display()))?;
    let t = match tensors.len() {
        1 => tensors.into_values().next().expect("one tensor"),
        _ => tensors.get("latents").cloned().with_context(|| {
            format!(
                "--latents {}: holds several tensors and none is named `latents`",
                path.display()
            )
        })?,
    };
    if t.rank() != 4 || t.dim(0)? != 1 {
        bail!(
            "--latents {}: shape {:?}, expected [1, channels, h/8, w/8]",
            path.display(),
            t.dims()
        );
    }
    Ok(t)
}

pub fn run(args: &SampleArgs) -> Result<ExitCode> {
    let rep = Reporter::new(args.quiet);
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    let deltas = crate::cli::DeltaArg::read_all(&args.deltas)?;
    let prompts = prompts(args, deltas.iter().find_map(|(d, _)| d.atomtune()))?;
    let latents = args.latents.as_deref().map(read_latents).transpose()?;

    let (dev, dt) = device_and_dtype(&args.model)?;
    rep.info(
        None,
        &format!(
            "loading {} on {} ({})",
            args.model.model,
            describe(&dev),
            precision(dt)
        ),
    );
    let on_cpu = dev.is_cpu();
    let opts = args.model.compute_options(dt, dev);
    let sd = StableDiffusion::load(&args.model.model, &opts)
        .with_context(|| format!("loading --model {}", args.model.model))?;
    for w in apply_deltas(&sd, &deltas, args.strict).context("applying --delta")? {
        rep.warn(None, &w);
    }
    if args.keep_packed_weights {
        if on_cpu && models::cpu_bf16::active() {
            models::weight_cache::set_in_inference(true);
        } else {
            rep.warn(
                None,
                "--keep-packed-weights keeps the CPU's bf16 operands; this run has none to keep",
            );
        }
    }
    let pipe = Pipeline::new(&sd)?;
    let kind = match &args.scheduler {
        Some(s) => s.parse::<SchedulerKind>()?,
        None => {
            let (kind, warning) = pipe.default_scheduler();
            if let Some(w) = warning {
                rep.warn(None, &w);
            }
            kind
        }
    };
    let f = sd.vae.downscale();
    let native = sd.unet.config().sample_size.unwrap_or(64) * f;
    let (width, height) = match (&latents, args.width, args.height) {
        (Some(l), None, None) => (l.dim(3)? * f, l.dim(2)? * f),
        (_, w, h) => (w.unwrap_or(native), h.unwrap_or(native)),
    };
    for (flag, v) in [("--width", width), ("--height", height)] {
        if v == 0 || v % f != 0 {
            bail!("{flag} {v}: must be a positive multiple of {f}");
        }
    }
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let mut index = next_index(&args.out);
    let deltas_text = args
        .deltas
        .iter()
        .map(|d| format!("{}: {}", d.path.display(), d.weight))
        .collect::<Vec<_>>()
        .join(", ");
    let total = prompts.len() * args.num_images;
    let mut made = Vec::new();
    let mut first_info = None;
    for prompt in &prompts {
        for i in 0..args.num_images {
            let s = seed.wrapping_add(i as u64);
            let req = Request {
                prompt: prompt.clone(),
                negative_prompt: args.negative_prompt.clone(),
                steps: args.steps,
                guidance: args.guidance,
                scheduler: kind,
                width,
                height,
                seed: s,
                latents: latents.clone(),
            };
            let pb = rep.bar(
                args.steps as u64,
                format!("image {}/{total}", made.len() + 1),
            );
            let out = pipe.generate(&req, &mut |st| {
                pb.set_length(st.total as u64);
                pb.set_position(st.done as u64);
            })?;
            pb.finish_and_clear();
            if i == 0 {
                for w in &out.warnings {
                    rep.warn(None, w);
                }
            }
            let (w, h, rgb) = to_rgb8(&out.image)?.remove(0);
            let mut extra = Vec::new();
            if !deltas_text.is_empty() {
                extra.push(("Deltas".to_string(), deltas_text.clone()));
            }
            if let Some(l) = &args.latents {
                extra.push(("Latents".into(), l.display().to_string()));
            }
            let info = Infotext::of_request(&req, &args.model.model, extra).render();
            let path: PathBuf = args.out.join(format!("{index:05}-{s}.png"));
            png_io::write_png(&path, w, h, &rgb, &info)?;
            rep.info(None, &format!("wrote {}", path.display()));
            first_info.get_or_insert(info);
            index += 1;
            made.push((w, h, rgb));
        }
    }
    if args.grid && made.len() > 1 {
        let (w, h, px) = grid(&made);
        let path = args.out.join(format!("grid-{index:05}.png"));
        png_io::write_png(&path, w, h, &px, first_info.as_deref().unwrap_or(""))?;
        rep.info(None, &format!("wrote {}", path.display()));
    }
    Ok(ExitCode::SUCCESS)
}
