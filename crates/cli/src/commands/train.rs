//! `atomtune train`: photos in, a delta out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use atoms::{AdapterConfig, DictionaryKind, LassoOptions, Method};
use models::{StableDiffusion, Targets};
use train::{AdamWConfig, Event, PriorConfig, TrainConfig, ValidationConfig};

use crate::cli::{OptimizerArg, TrainArgs};
use crate::device::{describe, device_and_dtype, precision};
use crate::format::{bytes, shell_word};
use crate::progress::Reporter;

/// Default learning rates per method, chosen by the sweep in README.md ("Choosing the defaults").
pub fn default_lr(method: Method) -> f64 {
    match method {
        Method::Atoms => 1e-3,
        Method::AtomsRec => 1e-3,
        Method::Lora => 1e-3,
        // not swept: diffusers' DreamBooth default for full fine-tuning
        Method::Full => 5e-6,
    }
}

fn adapter_config(a: &TrainArgs, method: Method) -> Result<AdapterConfig> {
    Ok(AdapterConfig {
        method,
        atoms: a.atoms,
        dictionary: match a.dictionary.as_str() {
            "lasso" => DictionaryKind::Lasso(LassoOptions {
                lambda: a.lasso_lambda,
                ..Default::default()
            }),
            _ => DictionaryKind::Svd,
        },
        sub_atoms: a.sub_atoms,
        rank: a.rank,
        lora_alpha: a.lora_alpha.unwrap_or(a.rank as f64),
        block: a.block.parse().context("--block")?,
        seed: a.seed,
    })
}

pub fn run(a: &TrainArgs) -> Result<ExitCode> {
    let rep = Reporter::new(a.quiet);
    let method: Method = a.method.parse()?;
    let targets: Targets = match &a.targets {
        Some(t) => t.parse()?,
        None if method == Method::Lora => Targets::Attn,
        None => Targets::Conv,
    };
    if !a.images.is_dir() {
        bail!("--images {}: no such folder", a.images.display());
    }
    let validation = validation(a)?;
    let (dev, dt) = device_and_dtype(&a.model)?;
    rep.info(
        None,
        &format!(
            "loading {} on {} ({})",
            a.model.model,
            describe(&dev),
            precision(dt)
        ),
    );
    let opts = a.model.compute_options(dt, dev);
    let sd = StableDiffusion::load(&a.model.model, &opts)
        .with_context(|| format!("loading --model {}", a.model.model))?;
    if let Some(mode) = a.gradient_checkpointing {
        sd.unet.layers().set_checkpointing(mode.into());
        // the memory-saving mode keeps no packed weights beside the weights either, unless
        // ATOMTUNE_KEEP_PACKED says
        if std::env::var_os(models::weight_cache::VAR).is_none() {
            models::weight_cache::set_enabled(false);
        }
    }
    let resolution = a
        .resolution
        .unwrap_or_else(|| sd.unet.config().sample_size.unwrap_or(64) * sd.vae.downscale());
    let fill = |s: &str| train::config::fill(s, &a.token, &a.class_word);
    let cfg = TrainConfig {
        images: a.images.clone(),
        token: a.token.clone(),
        class_word: a.class_word.clone(),
        instance_prompt: a.instance_prompt.clone(),
        resolution,
        center_crop: a.crop == "center",
        flip: a.flip,
        repeats: a.repeats,
        skip_bad_images: a.skip_bad_images,
        prior: a.class_images.as_ref().map(|dir| PriorConfig {
            class_prompt: fill(&a.class_prompt),
            class_dir: dir.clone(),
            num_class_images: a.num_class_images,
            weight: a.prior_weight,
            sample_steps: a.class_sample_steps,
        }),
        adapter: adapter_config(a, method)?,
        targets,
        lr: a.lr.unwrap_or_else(|| match a.optimizer {
            // Prodigy's learning rate multiplies its own estimate of the step size
            OptimizerArg::Prodigy => 1.0,
            OptimizerArg::Adamw => default_lr(method),
        }),
        lr_schedule: a.lr_schedule.parse()?,
        warmup_steps: a.warmup_steps,
        adamw: AdamWConfig {
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: 1e-8,
            weight_decay: a.weight_decay,
        },
        grad_accum: a.grad_accum,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        batch_size: a.batch_size,
        max_steps: a.max_steps,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every.filter(|&n| n > 0),
        validation,
        out: a.out.clone(),
        loss_scale: Default::default(),
        recipe: train::Recipe {
            min_snr_gamma: a.min_snr_gamma,
            noise_offset: a.noise_offset,
            caption_dropout: a.caption_dropout,
            ema: a.ema,
            masked_loss: a.masked_loss,
            optimizer: a.optimizer.into(),
            aspect_buckets: a.aspect_buckets,
            token_embedding_lr: a.train_token_embedding.then(|| {
                a.embedding_lr.unwrap_or(match a.optimizer {
                    OptimizerArg::Prodigy => 1.0,
                    OptimizerArg::Adamw => 5e-4,
                })
            }),
        },
    };
    let resume: Option<PathBuf> = match a.resume.as_deref() {
        None => None,
        Some("latest") => Some(
            train::checkpoint::latest(&a.out.join("checkpoints")).with_context(|| {
                format!(
                    "--resume latest: no checkpoint under {}",
                    a.out.join("checkpoints").display()
                )
            })?,
        ),
        Some(dir) => Some(PathBuf::from(dir)),
    };

    if !a.effective_config.is_empty() {
        let path = a.out.join("config.toml");
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("creating --out {}", a.out.display()))?;
        atoms::io::write_atomic(&path, a.effective_config.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }

    // Ctrl-C once: finish the step, checkpoint, write the delta, exit 0. Twice: stop at once.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        Arc::clone(&stop),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;

    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut phase_bar: Option<(String, indicatif::ProgressBar)> = None;
    let mut warned_stop = false;
    let mut events = |e: Event<'_>| match e {
        Event::Info(m) => rep.info(bar.as_ref(), &m),
        Event::Warn(m) => rep.warn(bar.as_ref(), &m),
        Event::Phase { name, done, total } => {
            let pb = match &phase_bar {
                Some((n, pb)) if n == name => pb.clone(),
                _ => {
                    let pb = rep.bar(total as u64, name.to_string());
                    phase_bar = Some((name.to_string(), pb.clone()));
                    pb
                }
            };
            pb.set_position(done as u64);
            if done == total {
                pb.finish_and_clear();
            }
        }
        Event::Step(r) => {
            let pb = bar.get_or_insert_with(|| {
                let pb = rep.bar(r.total as u64, "training".into());
                pb.set_position(r.step as u64 - 1);
                pb
            });
            pb.set_position(r.step as u64);
            pb.set_message(format!("training loss {:.4}", r.loss));
            if pb.is_hidden() && (r.step % 10 == 0 || r.step == r.total) {
                rep.info(
                    None,
                    &format!(
                        "step {}/{} loss {:.5} lr {:.2e} {:.2}s",
                        r.step, r.total, r.loss, r.lr, r.seconds
                    ),
                );
            }
            if stop.load(Ordering::SeqCst) && !warned_stop {
                warned_stop = true;
                rep.info(
                    Some(pb),
                    "stopping after this step (Ctrl-C again to quit at once)",
                );
            }
        }
    };
    let outcome = train::run(&sd, cfg, resume.as_deref(), &stop, &mut events)?;
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let size = std::fs::metadata(&outcome.delta)
        .map(|m| m.len())
        .unwrap_or(0);
    if outcome.interrupted {
        println!(
            "stopped at step {}: checkpoint {} and delta {} written.\nResume with the same flags plus: --resume latest",
            outcome.steps,
            outcome.checkpoint.as_ref().map_or("-".into(), |p| p.display().to_string()),
            outcome.delta.display()
        );
    } else {
        println!(
            "wrote {} ({}) after {} steps. Try it:\n  atomtune sample {} --delta {} --prompt {}",
            outcome.delta.display(),
            bytes(size),
            outcome.steps,
            a.model.flags(),
            shell_word(&outcome.delta.display().to_string()),
            shell_word(&fill(&a.instance_prompt))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The validation samples asked for; a validation option without `--validation-prompt` is an
/// error rather than ignored.
fn validation(a: &TrainArgs) -> Result<Option<ValidationConfig>> {
    let Some(prompt) = &a.validation_prompt else {
        let given = [
            ("--validation-every", a.validation_every),
            ("--validation-steps", a.validation_steps),
            ("--num-validation-images", a.num_validation_images),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, v)| v.is_some()) {
            bail!("{flag} needs --validation-prompt: the prompt to sample during training");
        }
        return Ok(None);
    };
    Ok(Some(ValidationConfig {
        prompt: prompt.clone(),
        every: a.validation_every.unwrap_or(100),
        steps: a.validation_steps.unwrap_or(20),
        num_images: a.num_validation_images.unwrap_or(1),
    }))
}
