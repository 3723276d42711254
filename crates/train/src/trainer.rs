//! The training loop (DESIGN.md section 2): cached latents and text embeddings, a timestep and
//! noise per example, the UNet with adapters, MSE to the noise (or `v`), backward to the adapter
//! parameters only, AdamW; checkpoints, validation images, metrics, and a clean stop on request.
//!
//! Every random choice (initialisation, data order, flips, crops, latent samples, timesteps,
//! noise) comes from one seeded generator on the host, saved in checkpoints, so a resumed run
//! ends bit-identical to an uninterrupted one on the CPU.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use atoms::{Delta, DeltaMeta, LayerAdapter};
use candle_core::{DType, Tensor, Var, D};
use models::{PromptEmbeds, StableDiffusion};
use sample::schedulers::{NoiseSchedule, Prediction, SchedulerConfig};
use sample::{noise, NoiseRng, Pipeline, Request};

use crate::cache::LatentCache;
use crate::checkpoint::{self, LoopState};
use crate::config::TrainConfig;
use crate::dataset::{self, ImageOptions};
use crate::ema::Ema;
use crate::loss_scale::LossScaler;
use crate::optim::{collect_grads, grad_norm, Optimizer};
use crate::pivotal::TokenEmbedding;
use crate::prior::{ensure_class_images, ClassImageOptions};
use crate::{Error, Result};

/// Something the CLI shows.
#[derive(Debug)]
pub enum Event<'a> {
    /// A log line.
    Info(String),
    /// A warning.
    Warn(String),
    /// Progress of a preparation phase.
    Phase {
        /// What is being done.
        name: &'a str,
        /// Units done.
        done: usize,
        /// Units in all.
        total: usize,
    },
    /// A training step finished.
    Step(&'a StepReport),
}

/// One optimizer step's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// The loss (instance + weighted prior), averaged over micro-batches.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The gradient's global norm before clipping (not finite when the step was skipped).
    pub grad_norm: f64,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    /// The loss scale the step ran with (f16 models, [`crate::loss_scale`]).
    pub loss_scale: Option<f64>,
    /// Whether the update was skipped: its scaled gradients overflowed f16.
    pub skipped: bool,
}

/// A fixed set of (latent, timestep, noise) to measure learning on.
pub struct EvalSet {
    /// One batch per latent shape (several with aspect buckets).
    parts: Vec<EvalPart>,
}

/// Examples of one shape of an [`EvalSet`].
struct EvalPart {
    x0: Tensor,
    cond: Conditioning,
    t: Vec<usize>,
    noise: Tensor,
}

/// What a batch of examples is conditioned on: text embeddings and SDXL's time ids `[b, 6]`.
struct Conditioning {
    text: PromptEmbeds,
    time_ids: Tensor,
    /// With masked loss: where each example's loss counts, `[b, 1, h, w]` in 0..1.
    mask: Option<Tensor>,
}

impl Conditioning {
    /// The batch of `parts` (text embeddings, time ids and masks of one example each); the
    /// masks are kept when any example has one (the others count everywhere).
    fn stack(
        text: &[&PromptEmbeds],
        time_ids: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Self> {
        let shape = masks.iter().flatten().next().map(|m| m.dims().to_vec());
        let mask = match shape {
            None => None,
            Some(shape) => {
                let device = time_ids[0].device();
                let full: Vec<Tensor> = masks
                    .iter()
                    .map(|m| match m {
                        Some(m) => Ok(m.clone()),
                        None => Ok(Tensor::ones(shape.as_slice(), DType::F32, device)?),
                    })
                    .collect::<Result<_>>()?;
                Some(Tensor::cat(&full, 0)?)
            }
        };
        Ok(Conditioning {
            text: PromptEmbeds::cat(text)?,
            time_ids: Tensor::cat(time_ids, 0)?,
            mask,
        })
    }
}

/// A prepared training run.
pub struct Trainer<'a> {
    sd: &'a StableDiffusion,
    cfg: TrainConfig,
    instance: LatentCache,
    prior: Option<LatentCache>,
    schedule: NoiseSchedule,
    prediction: Prediction,
    opt: Optimizer,
    rng: NoiseRng,
    order: Vec<usize>,
    pos: usize,
    step: usize,
    fingerprints: BTreeMap<String, String>,
    /// The dynamic loss scale, for f16 models.
    scaler: Option<LossScaler>,
    /// The embedding of the empty caption, with caption dropout.
    empty_text: Option<PromptEmbeds>,
    /// The moving average of the parameters, with `--ema`.
    ema: Option<Ema>,
    /// The trigger's trained embedding, with `--train-token-embedding`.
    embedding: Option<TokenEmbedding>,
}

/// Prints the aspect buckets and their photo counts; warns of a bucket with fewer photos than a
/// batch (its batches repeat photos).
fn report_buckets(images: &[dataset::TrainImage], batch: usize, events: &mut dyn FnMut(Event<'_>)) {
    let sizes: Vec<_> = images.iter().map(|i| (i.size.1, i.size.0)).collect();
    let counts = crate::buckets::counts(&sizes);
    let list: Vec<String> = counts
        .iter()
        .map(|((w, h), n)| format!("{w}x{h}: {n}"))
        .collect();
    events(Event::Info(format!(
        "aspect buckets (WxH: photos) {}",
        list.join(", ")
    )));
    for ((w, h), n) in counts {
        if n < batch {
            events(Event::Warn(format!(
                "bucket {w}x{h} has {n} photo(s), fewer than --batch-size {batch}: its batches repeat them"
            )));
        }
    }
}

/// The adapters' variables, then the token embedding's.
fn tuned_vars(opt: &Optimizer, embedding: Option<&TokenEmbedding>) -> Vec<Var> {
    opt.vars()
        .iter()
        .chain(embedding.into_iter().flat_map(|e| e.opt.vars()))
        .cloned()
        .collect()
}

fn is_flip_index(rng: &mut NoiseRng, flip: bool) -> bool {
    flip && rng.unit() < 0.5
}

impl<'a> Trainer<'a> {
    /// Loads the images, generates missing class images, caches latents and embeddings, and
    /// attaches fresh adapters, or those of the checkpoint `resume` (with its optimizer and
    /// generator state).
    pub fn prepare(
        sd: &'a StableDiffusion,
        cfg: TrainConfig,
        resume: Option<&Path>,
        events: &mut dyn FnMut(Event<'_>),
    ) -> Result<Self> {
        cfg.validate()?;
        let layers = sd.unet.layers();
        if !layers.vars().is_empty() {
            return Err(Error::Config(
                "the model already has adapters attached".into(),
            ));
        }
        // Class images and validation images sample with the model's scheduler; say so once
        // when it is not one we have.
        if let (_, Some(w)) = Pipeline::new(sd)?.default_scheduler() {
            events(Event::Warn(w));
        }
        let opts = ImageOptions {
            resolution: cfg.resolution,
            center_crop: cfg.center_crop,
            skip_bad: cfg.skip_bad_images,
            masks: cfg.recipe.masked_loss,
            aspect_buckets: cfg.recipe.aspect_buckets,
        };
        let images = dataset::load_folder(&cfg.images, opts, &mut |w| events(Event::Warn(w)))?;
        if cfg.recipe.masked_loss {
            let n = images.iter().filter(|i| i.mask.is_some()).count();
            if n == 0 {
                events(Event::Warn(
                    "--masked-loss: no photo has a mask (name.mask.png beside it, or an alpha channel); the loss counts everywhere".into(),
                ));
            } else {
                events(Event::Info(format!(
                    "masked loss: {n} of {} photos have a mask",
                    images.len()
                )));
            }
        }
        if cfg.recipe.aspect_buckets {
            report_buckets(&images, cfg.batch_size, events);
        }
        let instance_text = cfg.instance_text();
        let captions: Vec<String> = images
            .iter()
            .map(|i| i.caption.clone().unwrap_or_else(|| instance_text.clone()))
            .collect();
        events(Event::Info(format!(
            "{} training images from {} ({} with their own caption)",
            images.len(),
            cfg.images.display(),
            images.iter().filter(|i| i.caption.is_some()).count()
        )));
        let prior = match &cfg.prior {
            None => None,
            Some(p) => {
                let o = ClassImageOptions {
                    prompt: p.class_prompt.clone(),
                    count: p.num_class_images,
                    steps: p.sample_steps,
                    guidance: 7.5,
                    resolution: cfg.resolution,
                    seed: cfg.seed.wrapping_add(1_000_000),
                };
                let written = ensure_class_images(sd, &p.class_dir, &o, &mut |done, total| {
                    events(Event::Phase {
                        name: "generating class images",
                        done,
                        total,
                    })
                })?;
                if !written.is_empty() {
                    events(Event::Info(format!(
                        "generated {} class images in {}",
                        written.len(),
                        p.class_dir.display()
                    )));
                }
                let mut class_images = dataset::load_folder(
                    &p.class_dir,
                    ImageOptions {
                        masks: false,
                        aspect_buckets: false,
                        ..opts
                    },
                    &mut |w| events(Event::Warn(w)),
                )?;
                class_images.truncate(p.num_class_images);
                let caps = vec![p.class_prompt.clone(); class_images.len()];
                Some(LatentCache::build(
                    sd,
                    &class_images,
                    &caps,
                    cfg.flip,
                    &mut |done, total| {
                        events(Event::Phase {
                            name: "encoding class images",
                            done,
                            total,
                        })
                    },
                )?)
            }
        };
        let instance = LatentCache::build(sd, &images, &captions, cfg.flip, &mut |done, total| {
            events(Event::Phase {
                name: "encoding images",
                done,
                total,
            })
        })?;
        let (path, text) = &sd.scheduler_config;
        let sc = SchedulerConfig::parse(path, text)?;
        let schedule = NoiseSchedule::from_config(&sc)?;
        let prediction = match serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| {
                v.get("prediction_type")
                    .and_then(|p| p.as_str().map(String::from))
            })
            .as_deref()
        {
            None | Some("epsilon") => Prediction::Epsilon,
            Some("v_prediction") => Prediction::VPrediction,
            Some("sample") => Prediction::Sample,
            Some(other) => {
                return Err(Error::Config(format!(
                    "{}: unknown prediction_type {other:?}",
                    path.display()
                )))
            }
        };

        let (rng, order, pos, step, opt_state, scale_state, resumed) = match resume {
            Some(dir) => {
                let ck = checkpoint::read(dir)?;
                if ck.state.fingerprint != cfg.fingerprint() {
                    return Err(Error::Checkpoint {
                        path: dir.into(),
                        reason: "it was made with other settings (method, data, learning rate, seed...); resume with the same flags, or start a new --out".into(),
                    });
                }
                ck.delta.check_base(layers, true)?;
                for (name, adapter) in ck.delta.adapters(layers)? {
                    layers.attach(&name, adapter, 1.0)?;
                }
                events(Event::Info(format!(
                    "resuming from {} (step {})",
                    ck.dir.display(),
                    ck.state.step
                )));
                (
                    NoiseRng::from_state(ck.state.rng()?),
                    ck.state.order,
                    ck.state.pos,
                    ck.state.step,
                    Some(ck.optimizer),
                    ck.state.loss_scale,
                    Some(ck.delta),
                )
            }
            None => {
                let targets = layers.select(cfg.targets);
                if targets.is_empty() {
                    return Err(Error::Config(format!(
                        "--targets {} selects no layer of this model",
                        cfg.targets
                    )));
                }
                for name in &targets {
                    let base = layers.base_weight(name)?;
                    layers.attach(name, LayerAdapter::new(&cfg.adapter, name, &base)?, 1.0)?;
                }
                (NoiseRng::new(cfg.seed), Vec::new(), 0, 0, None, None, None)
            }
        };
        let mut opt = Optimizer::new(cfg.recipe.optimizer, layers.vars(), cfg.adamw)?;
        let mut embedding = match cfg.recipe.token_embedding_lr {
            Some(_) => Some(TokenEmbedding::attach(
                sd,
                &cfg.token,
                &cfg.class_word,
                resumed.as_ref(),
                cfg.recipe.optimizer,
                cfg.adamw,
            )?),
            None => None,
        };
        let mut ema = cfg
            .recipe
            .ema
            .map(|d| Ema::new(&tuned_vars(&opt, embedding.as_ref()), d))
            .transpose()?;
        if let Some(mut s) = opt_state {
            let averages: HashMap<String, Tensor> = s
                .iter()
                .filter(|(k, _)| k.starts_with(crate::ema::PREFIX))
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect();
            if let Some(e) = &mut embedding {
                e.load_state(&s)?;
            }
            s.retain(|k, _| {
                !k.starts_with(crate::ema::PREFIX) && !k.starts_with(crate::pivotal::PREFIX)
            });
            opt.load_state(&s)?;
            if let Some(e) = &mut ema {
                e.load_state(&averages)?;
            }
        }
        let scaler = (sd.unet.dtype() == DType::F16).then(|| match scale_state {
            Some(s) => LossScaler::from_state(cfg.loss_scale, s),
            None => LossScaler::new(cfg.loss_scale),
        });
        let empty_text = if cfg.recipe.caption_dropout > 0.0 {
            Some(sd.encode(&[""])?.0)
        } else {
            None
        };
        for (k, v) in cfg.recipe.entries() {
            events(Event::Info(format!("recipe: {k} = {v}")));
        }
        let params: usize = opt.vars().iter().map(|v| v.elem_count()).sum();
        events(Event::Info(format!(
            "{} on {} layers ({} trainable parameters)",
            cfg.adapter.method,
            layers.adapted().len(),
            params
        )));
        if let Some(e) = &embedding {
            let n: usize = e.opt.vars().iter().map(|v| v.elem_count()).sum();
            events(Event::Info(format!(
                "token {:?}: a new token with its own embedding ({n} numbers over {} text encoder(s)), started at {:?}'s",
                cfg.token,
                e.opt.vars().len(),
                cfg.class_word
            )));
        }
        Ok(Trainer {
            sd,
            cfg,
            instance,
            prior,
            schedule,
            prediction,
            opt,
            rng,
            order,
            pos,
            step,
            fingerprints: BTreeMap::new(),
            scaler,
            empty_text,
            ema,
            embedding,
        })
    }

    /// The text embedding of the instance cache's caption `k`: encoded now, through the
    /// trained token embedding, under pivotal tuning; else the cached one.
    fn caption(&self, k: usize) -> Result<PromptEmbeds> {
        if self.embedding.is_some() {
            Ok(self.sd.encode(&[self.instance.captions[k].as_str()])?.0)
        } else {
            Ok(self.instance.embeddings[k].clone())
        }
    }

    /// Every tuned variable: the adapters', then the token embedding's.
    fn tuned_vars(&self) -> Vec<Var> {
        tuned_vars(&self.opt, self.embedding.as_ref())
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    fn next_index(&mut self) -> usize {
        if self.pos >= self.order.len() {
            let targets: Vec<(usize, usize)> =
                self.instance.images.iter().map(|i| i.target).collect();
            self.order = crate::buckets::epoch_order(
                targets.len(),
                self.cfg.repeats,
                self.cfg.batch_size,
                self.cfg.recipe.aspect_buckets.then_some(targets.as_slice()),
                &mut self.rng,
            );
            self.pos = 0;
        }
        let i = self.order[self.pos];
        self.pos += 1;
        i
    }

    /// One micro-batch's loss: `instance MSE + prior weight * class MSE`.
    fn micro_loss(&mut self) -> Result<Tensor> {
        let (mut zs, mut texts, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut masks = Vec::new();
        for _ in 0..self.cfg.batch_size {
            let i = self.next_index();
            let flip = is_flip_index(&mut self.rng, self.cfg.flip);
            let d = self.instance.draw(i, flip, &mut self.rng)?;
            zs.push(d.latent);
            ids.push(d.time_ids);
            masks.push(d.mask);
            texts.push(self.caption(self.instance.images[i].caption)?);
        }
        if let Some(prior) = &self.prior {
            for _ in 0..self.cfg.batch_size {
                let j = self.rng.below(prior.images.len() as u64) as usize;
                let flip = is_flip_index(&mut self.rng, self.cfg.flip);
                let d = prior.draw(j, flip, &mut self.rng)?;
                zs.push(d.latent);
                ids.push(d.time_ids);
                masks.push(None);
                texts.push(prior.embeddings[prior.images[j].caption].clone());
            }
        }
        let t: Vec<usize> = (0..zs.len())
            .map(|_| self.rng.below(self.schedule.len() as u64) as usize)
            .collect();
        // caption dropout over the whole batch (class examples too), drawn after the examples
        if self.empty_text.is_some() {
            for text in texts.iter_mut() {
                if self.cfg.recipe.drop_caption(&mut self.rng) {
                    *text = self.empty_text.clone().expect("checked");
                }
            }
        }
        // One UNet batch, or two when aspect buckets give the instance examples another shape
        // than the (square) class images.
        let n = zs.len();
        let bs = self.cfg.batch_size;
        let split = if zs.iter().all(|z| z.dims() == zs[0].dims()) {
            n
        } else {
            bs
        };
        let mut per_example = Vec::new();
        for g in [0..split, split..n].into_iter().filter(|g| !g.is_empty()) {
            let x0 = Tensor::cat(&zs[g.clone()], 0)?;
            let text: Vec<&PromptEmbeds> = texts[g.clone()].iter().collect();
            let cond = Conditioning::stack(&text, &ids[g.clone()], &masks[g.clone()])?;
            let eps = self.cfg.recipe.noise(&mut self.rng, &x0)?;
            per_example.push(self.per_example_loss(&x0, &cond, &t[g], &eps)?);
        }
        self.combine(&Tensor::cat(&per_example, 0)?, bs)
    }

    /// The batch loss of per-example losses `[n]`: the first `n_instance` are instance examples,
    /// the rest class examples (weighted by the prior weight).
    fn combine(&self, per_example: &Tensor, n_instance: usize) -> Result<Tensor> {
        let n = per_example.dim(0)?;
        let inst = per_example.narrow(0, 0, n_instance)?.mean_all()?;
        if n > n_instance {
            let w = self.cfg.prior.as_ref().map_or(1.0, |p| p.weight);
            let class = per_example
                .narrow(0, n_instance, n - n_instance)?
                .mean_all()?;
            Ok((inst + (class * w)?)?)
        } else {
            Ok(inst)
        }
    }

    /// Each example's loss `[n]`: the MSE of the UNet's prediction to its target (over the
    /// mask with masked loss), Min-SNR weighted when on.
    fn per_example_loss(
        &self,
        x0: &Tensor,
        cond: &Conditioning,
        t: &[usize],
        eps: &Tensor,
    ) -> Result<Tensor> {
        let xt = noise::add_noise(&self.schedule, x0, eps, t)?;
        let target = noise::target(&self.schedule, self.prediction, x0, eps, t)?;
        let dtype = self.sd.unet.dtype();
        let tt = Tensor::new(
            t.iter().map(|&x| x as u32).collect::<Vec<_>>().as_slice(),
            x0.device(),
        )?;
        let text = cond.text.to_dtype(dtype)?;
        let text_time = self.sd.text_time(&text, &cond.time_ids);
        let pred = self
            .sd
            .unet
            .forward_with(&xt.to_dtype(dtype)?, &tt, &text.context, text_time.as_ref())?
            .to_dtype(DType::F32)?;
        let sq = (pred - target)?.sqr()?;
        let mut per_example = match &cond.mask {
            // the mean over where the mask is: sum(m * sq) / (sum(m) * channels); 0 where it
            // is empty
            Some(m) => {
                let c = sq.dim(1)? as f64;
                let num = sq.broadcast_mul(m)?.flatten_from(1)?.sum(D::Minus1)?;
                let den = ((m.flatten_from(1)?.sum(D::Minus1)? * c)?.maximum(1e-12))?;
                (num / den)?
            }
            None => sq.flatten_from(1)?.mean(D::Minus1)?,
        };
        if let Some(w) =
            self.cfg
                .recipe
                .loss_weights(&self.schedule, self.prediction, t, x0.device())?
        {
            per_example = (per_example * w)?;
        }
        Ok(per_example)
    }

    /// One optimizer step over `grad_accum` micro-batches. With an f16 model the loss is scaled
    /// before the backward and the gradients unscaled before clipping and the update; a step
    /// whose scaled gradients overflow is skipped ([`crate::loss_scale`]).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let vars = self.tuned_vars();
        let accum = self.cfg.grad_accum;
        let loss_scale = self.scaler.as_ref().map(LossScaler::scale);
        let mul = loss_scale.unwrap_or(1.0) / accum as f64;
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        for _ in 0..accum {
            let loss = self.micro_loss()?;
            let l = loss.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(Error::NonFinite {
                    step: self.step + 1,
                    value: l,
                    last: checkpoint::latest(&self.cfg.out.join("checkpoints"))
                        .map_or("none written yet".into(), |p| p.display().to_string()),
                });
            }
            loss_sum += l as f64 / accum as f64;
            let grads = (loss * mul)?.backward()?;
            for (a, g) in acc.iter_mut().zip(collect_grads(&vars, &grads)) {
                *a = match (a.take(), g) {
                    (Some(x), Some(g)) => Some((x + g)?),
                    (x, g) => x.or(g),
                };
            }
        }
        // The norm of the unscaled gradients (not finite when the scaled ones overflowed).
        let norm = grad_norm(&acc)? / loss_scale.unwrap_or(1.0);
        let apply = match &mut self.scaler {
            Some(s) => s.update(norm.is_finite()),
            None => true,
        };
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max => max / norm,
            _ => 1.0,
        };
        let lr = self.cfg.lr_schedule.at(
            self.step,
            self.cfg.max_steps,
            self.cfg.lr,
            self.cfg.warmup_steps,
        );
        if apply {
            let scale = clip / loss_scale.unwrap_or(1.0);
            let n = self.opt.vars().len();
            self.opt.step(&acc[..n], lr, scale)?;
            if let (Some(e), Some(peak)) = (&mut self.embedding, self.cfg.recipe.token_embedding_lr)
            {
                let c = &self.cfg;
                let lr = c
                    .lr_schedule
                    .at(self.step, c.max_steps, peak, c.warmup_steps);
                e.opt.step(&acc[n..], lr, scale)?;
            }
            if let Some(e) = &mut self.ema {
                e.update(&vars)?;
            }
        }
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            total: self.cfg.max_steps,
            loss: loss_sum,
            lr,
            grad_norm: norm,
            seconds: start.elapsed().as_secs_f64(),
            loss_scale,
            skipped: !apply,
        })
    }

    /// A fixed evaluation set: each training image's mean latent (center, not mirrored) at
    /// `timesteps`, with noise from `seed`.
    pub fn eval_set(&self, timesteps: &[usize], seed: u64) -> Result<EvalSet> {
        let mut rng = NoiseRng::new(seed);
        let mut shapes: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for (i, img) in self.instance.images.iter().enumerate() {
            shapes.entry(img.target).or_default().push(i);
        }
        let mut parts = Vec::new();
        for members in shapes.values() {
            let (mut zs, mut texts, mut ids, mut ts) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut masks = Vec::new();
            for &i in members {
                let d = self.instance.center(i)?;
                for &t in timesteps {
                    zs.push(d.latent.clone());
                    masks.push(d.mask.clone());
                    ids.push(d.time_ids.clone());
                    texts.push(self.caption(self.instance.images[i].caption)?);
                    ts.push(t);
                }
            }
            let x0 = Tensor::cat(&zs, 0)?;
            let texts: Vec<&PromptEmbeds> = texts.iter().collect();
            parts.push(EvalPart {
                noise: rng.randn(x0.dims(), DType::F32, x0.device())?,
                cond: Conditioning::stack(&texts, &ids, &masks)?,
                x0,
                t: ts,
            });
        }
        Ok(EvalSet { parts })
    }

    /// The loss on an evaluation set with the adapters as they are now.
    pub fn eval_loss(&self, set: &EvalSet) -> Result<f64> {
        let mut per_example = Vec::new();
        for p in &set.parts {
            per_example.push(self.per_example_loss(&p.x0, &p.cond, &p.t, &p.noise)?);
        }
        let l = Tensor::cat(&per_example, 0)?.detach().mean_all()?;
        Ok(l.to_scalar::<f32>()? as f64)
    }

    /// The adapters as a delta, with the run's metadata.
    pub fn delta(&mut self) -> Result<Delta> {
        let layers = self.sd.unet.layers();
        let attached: Vec<(String, Arc<LayerAdapter>)> = layers
            .adapted()
            .into_iter()
            .filter_map(|n| layers.adapters(&n).into_iter().next().map(|(a, _)| (n, a)))
            .collect();
        let c = &self.cfg;
        let mut meta = DeltaMeta::new(c.adapter.clone(), self.sd.id.clone());
        meta.base_architecture = Some(self.sd.architecture.name().to_string());
        meta.fingerprints = self.fingerprints.clone();
        meta.targets = Some(c.targets.to_string());
        meta.trigger = Some(c.token.clone());
        meta.class = Some(c.class_word.clone());
        meta.steps = Some(self.step as u64);
        meta.seed = Some(c.seed);
        meta.created = Some(now_rfc3339());
        for (k, v) in [
            ("lr", c.lr.to_string()),
            ("lr_schedule", c.lr_schedule.to_string()),
            ("batch_size", c.batch_size.to_string()),
            ("resolution", c.resolution.to_string()),
            ("instance_prompt", c.instance_text()),
            ("prior_preservation", c.prior.is_some().to_string()),
        ] {
            meta.extra.insert(k.to_string(), v);
        }
        for (k, v) in c.recipe.entries() {
            meta.extra.insert(k.to_string(), v);
        }
        let mut delta = Delta::from_adapters(
            meta,
            attached.iter().map(|(n, a)| (n.as_str(), a.as_ref())),
            layers,
        )?;
        if let Some(e) = &self.embedding {
            delta = delta.with_embeddings(e.embeddings()?)?;
        }
        self.fingerprints = delta.meta().fingerprints.clone();
        Ok(delta)
    }

    /// The delta the run hands out: the moving average of the parameters with `--ema`, else
    /// the parameters (checkpoints always hold the raw ones).
    pub fn output_delta(&mut self) -> Result<Delta> {
        let Some(e) = &self.ema else {
            return self.delta();
        };
        let vars = self.tuned_vars();
        let raw = e.swap_in(&vars)?;
        // a delta's tensors share the variables' storage, which the restore overwrites in
        // place: keep a copy of its bytes
        let delta = self
            .delta()
            .and_then(|d| Ok(Delta::from_bytes(&d.to_bytes()?)?));
        Ema::restore(&vars, &raw)?;
        delta
    }

    /// Writes a checkpoint of the current step under `OUT/checkpoints`.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let delta = self.delta()?;
        let rng = self.rng.state();
        let state = LoopState {
            step: self.step,
            rng_seed: rng.seed,
            rng_word_pos: rng.word_pos.to_string(),
            order: self.order.clone(),
            pos: self.pos,
            fingerprint: self.cfg.fingerprint(),
            loss_scale: self.scaler.as_ref().map(LossScaler::state),
        };
        let mut tensors = self.opt.state()?;
        if let Some(e) = &self.ema {
            tensors.extend(e.state()?);
        }
        if let Some(e) = &self.embedding {
            tensors.extend(e.state()?);
        }
        checkpoint::write(&self.cfg.out.join("checkpoints"), &delta, &tensors, &state)
    }

    /// What `loss.png` shows of the run whose metrics are at `metrics`: its steps, the steps
    /// validation images were made after, a title naming the subject, method and base.
    fn loss_curve(&self, metrics: &Path) -> crate::plot::LossCurve {
        let c = &self.cfg;
        let points =
            crate::plot::read_points(&std::fs::read_to_string(metrics).unwrap_or_default());
        let last = points.last().map_or(0, |p| p.step);
        let validation_steps = match &c.validation {
            Some(v) => (1..=last)
                .filter(|s| s % v.every == 0 || *s == c.max_steps)
                .collect(),
            None => Vec::new(),
        };
        // the photo folder's name, when it says more than the class word
        let subject = c
            .images
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| *n != c.class_word)
            .map_or(String::new(), |n| format!(" ({n})"));
        crate::plot::LossCurve {
            title: format!(
                "{} {}{subject}: {} on {}",
                c.token, c.class_word, c.adapter.method, self.sd.id
            ),
            points,
            validation_steps,
        }
    }

    /// Samples the validation prompt with the adapters as they are now; returns the PNGs.
    pub fn validate(&self) -> Result<Vec<PathBuf>> {
        let Some(v) = &self.cfg.validation else {
            return Ok(Vec::new());
        };
        let pipe = Pipeline::new(self.sd)?;
        let dir = self.cfg.out.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let prompt = self.cfg.fill(&v.prompt);
        let mut out = Vec::new();
        for i in 0..v.num_images {
            let req = Request {
                prompt: prompt.clone(),
                negative_prompt: None,
                steps: v.steps,
                guidance: 7.5,
                scheduler: pipe.default_scheduler().0,
                width: self.cfg.resolution,
                height: self.cfg.resolution,
                seed: self.cfg.seed.wrapping_add(i as u64),
                latents: None,
            };
            let g = pipe.generate(&req, &mut |_| {})?;
            let (w, h, rgb) = sample::pipeline::to_rgb8(&g.image)?.remove(0);
            let step = ("Training step".to_string(), self.step.to_string());
            let info = sample::Infotext::of_request(&req, &self.sd.id, [step]);
            let path = dir.join(format!("step-{:06}-{i}.png", self.step));
            sample::png_io::write_png(&path, w, h, &rgb, &info.render())?;
            out.push(path);
        }
        Ok(out)
    }
}

/// The current UTC time as RFC 3339, without a date crate: days since the epoch to a civil date.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The final delta.
    pub delta: PathBuf,
    /// Steps done.
    pub steps: usize,
    /// Whether a stop request ended it early.
    pub interrupted: bool,
    /// The last checkpoint written, if any.
    pub checkpoint: Option<PathBuf>,
}

/// Keeps the run record and the metrics of steps up to `step` (a resumed run rewrites what came
/// after).
fn trim_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v = serde_json::from_str::<serde_json::Value>(l).ok();
            v.as_ref().is_some_and(|v| v.get("run").is_some())
                || v.and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    atoms::io::write_atomic(path, out.as_bytes())?;
    Ok(())
}

/// A failed write of the run's output, saying what is intact and how to resume.
fn write_failed(out: &Path, what: &str, e: Error) -> Error {
    let resume = match checkpoint::latest(&out.join("checkpoints")) {
        Some(p) => format!(
            "the last checkpoint ({}) is intact: free some space or fix the folder, then run the same command again with --resume latest",
            p.display()
        ),
        None => "no checkpoint was written yet: free some space or fix the folder, then run the same command again (add --checkpoint-every N to keep progress)".into(),
    };
    Error::Write {
        what: what.into(),
        reason: e.to_string(),
        resume,
    }
}

/// Runs a whole training: prepare (or resume), step to `max_steps` with checkpoints, validation
/// and metrics, then write `OUT/delta.safetensors` and `OUT/loss.png`. When `stop` is set, the
/// current step finishes, a checkpoint and the delta are written, and the run returns
/// `interrupted`.
pub fn run(
    sd: &StableDiffusion,
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop: &AtomicBool,
    events: &mut dyn FnMut(Event<'_>),
) -> Result<Outcome> {
    let out = cfg.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let mut t = Trainer::prepare(sd, cfg, resume, events)?;
    let metrics_path = out.join("metrics.jsonl");
    if resume.is_some() {
        trim_metrics(&metrics_path, t.step)?;
    } else {
        // the first line records the run's options
        let first = format!("{}\n", t.cfg.record(&sd.id));
        atoms::io::write_atomic(&metrics_path, first.as_bytes())?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut last_checkpoint = None;
    let mut interrupted = false;
    let total = t.cfg.max_steps;
    while t.step < total {
        let r = t.train_step()?;
        let mut line = serde_json::json!({
            "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "seconds": r.seconds,
        });
        if let Some(scale) = r.loss_scale {
            line["loss_scale"] = scale.into();
            line["skipped"] = r.skipped.into();
        }
        writeln!(metrics, "{line}").map_err(|e| {
            write_failed(
                &out,
                &metrics_path.display().to_string(),
                Error::io(&metrics_path, e),
            )
        })?;
        events(Event::Step(&r));
        let stopping = stop.load(Ordering::SeqCst);
        if t.cfg.checkpoint_every.is_some_and(|n| r.step % n == 0) || stopping {
            let p = t.checkpoint().map_err(|e| {
                write_failed(&out, &format!("the checkpoint of step {}", r.step), e)
            })?;
            events(Event::Info(format!("checkpoint {}", p.display())));
            last_checkpoint = Some(p);
        }
        if let Some(v) = &t.cfg.validation {
            if r.step % v.every == 0 && r.step < total {
                for p in t.validate()? {
                    events(Event::Info(format!("validation image {}", p.display())));
                }
            }
        }
        if stopping {
            interrupted = true;
            break;
        }
    }
    if !interrupted && t.cfg.validation.is_some() {
        for p in t.validate()? {
            events(Event::Info(format!("validation image {}", p.display())));
        }
    }
    let delta_path = out.join("delta.safetensors");
    t.output_delta()?
        .write(&delta_path)
        .map_err(|e| write_failed(&out, &delta_path.display().to_string(), e.into()))?;
    let plot = out.join("loss.png");
    crate::plot::write_loss_curve(&plot, &t.loss_curve(&metrics_path))
        .map_err(|e| write_failed(&out, &plot.display().to_string(), e))?;
    Ok(Outcome {
        delta: delta_path,
        steps: t.step,
        interrupted,
        checkpoint: last_checkpoint,
    })
}
