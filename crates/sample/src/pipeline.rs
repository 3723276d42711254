//! Text to image: tokenizers -> text encoders (negative and positive prompt in one batch) ->
//! scheduler loop with classifier-free guidance -> VAE decode. As diffusers'
//! `StableDiffusionPipeline` and `StableDiffusionXLPipeline`, so that a run from the same initial
//! latents gives the same image.

use atoms::kohya::{AdapterFile, AnyDelta};
use candle_core::{DType, Tensor};
use models::{PromptEmbeds, StableDiffusion, TextTime};

use crate::rng::NoiseRng;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::{Error, Result};

/// One image to make.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt.
    pub prompt: String,
    /// What to steer away from. `None`: SD 1.x/2.x encode "", SDXL uses zero unconditional
    /// embeddings (`force_zeros_for_empty_prompt`); `Some("")` encodes "" on every model.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` skips the unconditional pass.
    pub guidance: f64,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// Image width in pixels (a multiple of the VAE's factor, 8).
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Seed of the initial noise and of stochastic schedulers' noise.
    pub seed: u64,
    /// Initial latents `[1, c, h/8, w/8]` instead of seeded noise (multiplied by the scheduler's
    /// `init_noise_sigma`, like diffusers' `latents=`).
    pub latents: Option<Tensor>,
}

/// What a run made.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The final latents (unscaled), `[1, c, h/8, w/8]`, f32.
    pub latents: Tensor,
    /// The raw VAE decode, about `[-1, 1]`, `[1, 3, h, w]`, f32.
    pub image: Tensor,
    /// Things the user should know (prompts cut to the tokenizer's length).
    pub warnings: Vec<String>,
}

/// Where a run stands, for progress reports.
#[derive(Debug)]
pub struct Step<'t> {
    /// Steps done.
    pub done: usize,
    /// Steps in all.
    pub total: usize,
    /// The latents after this step.
    pub latents: &'t Tensor,
}

/// A loaded model ready to sample.
pub struct Pipeline<'a> {
    sd: &'a StableDiffusion,
    config: SchedulerConfig,
}

impl<'a> Pipeline<'a> {
    /// A pipeline over `sd`, with its scheduler config.
    pub fn new(sd: &'a StableDiffusion) -> Result<Self> {
        let (path, text) = &sd.scheduler_config;
        Ok(Pipeline {
            sd,
            config: SchedulerConfig::parse(path, text)?,
        })
    }

    /// The model's scheduler config.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The scheduler the model's config names (`_class_name`) when it is one we have; else DDIM,
    /// with a warning that names the model's class and says how to pick another.
    pub fn default_scheduler(&self) -> (SchedulerKind, Option<String>) {
        let v: Option<serde_json::Value> = serde_json::from_str(&self.sd.scheduler_config.1).ok();
        let class = v
            .as_ref()
            .and_then(|v| v.get("_class_name")?.as_str().map(String::from));
        match class.as_deref().map(SchedulerKind::from_class_name) {
            Some(Some(kind)) => (kind, None),
            found => (
                SchedulerKind::Ddim,
                Some(format!(
                    "{}: {}; sampling with DDIM (choose with --scheduler)",
                    self.sd.scheduler_config.0.display(),
                    match (found, class) {
                        (Some(None), Some(c)) => format!("scheduler `{c}` is not one atomtune has"),
                        _ => "no `_class_name`".to_string(),
                    }
                )),
            ),
        }
    }

    /// Text embeddings of `prompts`, and a warning per prompt that was cut.
    pub fn encode(&self, prompts: &[&str]) -> Result<(PromptEmbeds, Vec<String>)> {
        Ok(self.sd.encode(prompts)?)
    }

    /// The conditioning of a request: the prompt's embeddings, preceded by the unconditional
    /// ones when guidance is on.
    fn conditioning(&self, req: &Request) -> Result<(PromptEmbeds, Vec<String>)> {
        if req.guidance <= 1.0 {
            return self.encode(&[&req.prompt]);
        }
        match &req.negative_prompt {
            None if self.sd.force_zeros_for_empty_prompt => {
                let (cond, warnings) = self.encode(&[&req.prompt])?;
                Ok((PromptEmbeds::cat(&[&cond.zeros_like()?, &cond])?, warnings))
            }
            negative => self.encode(&[negative.as_deref().unwrap_or(""), &req.prompt]),
        }
    }

    /// SDXL's added conditioning for a `width` x `height` image, for `embeds`' batch: the
    /// pipeline's default time ids (original = target size, no crop). `None` for SD 1.x/2.x.
    fn text_time(
        &self,
        embeds: &PromptEmbeds,
        width: usize,
        height: usize,
    ) -> Result<Option<TextTime>> {
        let Some(pooled) = &embeds.pooled else {
            return Ok(None);
        };
        let ids = TextTime::time_ids((height, width), (0, 0), (height, width), pooled.device())?
            .repeat((pooled.dim(0)?, 1))?;
        Ok(self.sd.text_time(embeds, &ids))
    }

    /// Runs one request; `progress` is called after each step.
    pub fn generate(&self, req: &Request, progress: &mut dyn FnMut(Step<'_>)) -> Result<Generated> {
        let unet = &self.sd.unet;
        let f = self.sd.vae.downscale();
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(f)
            || !req.height.is_multiple_of(f)
        {
            return Err(Error::Request(format!(
                "--width and --height must be positive multiples of {f}, not {}x{}",
                req.width, req.height
            )));
        }
        let (lh, lw) = (req.height / f, req.width / f);
        let lc = unet.config().in_channels;
        let cfg = req.guidance > 1.0;
        let (embeds, warnings) = self.conditioning(req)?;
        let text_time = self.text_time(&embeds, req.width, req.height)?;
        let ctx = embeds.context;
        let dtype = ctx.dtype();
        let device = ctx.device().clone();
        let mut scheduler = req.scheduler.build(&self.config, req.steps)?;
        let mut rng = NoiseRng::new(req.seed);
        let init = match &req.latents {
            Some(l) => {
                if l.dims() != [1, lc, lh, lw] {
                    return Err(Error::Request(format!(
                        "initial latents have shape {:?}, a {}x{} image needs [1, {lc}, {lh}, {lw}]",
                        l.dims(),
                        req.width,
                        req.height
                    )));
                }
                l.to_dtype(DType::F32)?.to_device(&device)?
            }
            None => rng.randn(&[1, lc, lh, lw], DType::F32, &device)?,
        };
        let mut x = (init * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&x, i)?;
            let input = if cfg {
                Tensor::cat(&[&input, &input], 0)?
            } else {
                input
            };
            let t = Tensor::new(&[t as f32], &device)?;
            let out = unet
                .forward_with(&input.to_dtype(dtype)?, &t, &ctx, text_time.as_ref())?
                .to_dtype(DType::F32)?;
            let eps = if cfg {
                let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
                (&u + ((c - &u)? * req.guidance)?)?
            } else {
                out
            };
            x = scheduler.step(&eps, i, &x, &mut rng)?;
            progress(Step {
                done: i + 1,
                total,
                latents: &x,
            });
        }
        let image = self.decode(&x)?;
        Ok(Generated {
            latents: x,
            image,
            warnings,
        })
    }

    /// The raw VAE decode of unscaled latents, f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let vae = &self.sd.vae;
        let z = (latents / vae.scaling_factor())?.to_dtype(vae.dtype())?;
        Ok(vae.decode(&z)?.to_dtype(DType::F32)?)
    }
}

/// Attaches deltas, each at its weight, and bakes the effective weights: atomtune deltas on the
/// UNet, kohya / LyCORIS files (LoRA, LoCon, diff) on the UNet and text encoders their modules
/// name. An atomtune delta that does not fit the architecture is an error; one trained on a
/// different base of the same architecture is applied with a warning (an error with `strict`).
/// A kohya file none of whose modules fit is an error; modules that fit nothing are listed in a
/// warning. Returns the warnings.
pub fn apply_deltas(
    sd: &StableDiffusion,
    deltas: &[(AnyDelta, f64)],
    strict: bool,
) -> Result<Vec<String>> {
    let warnings = attach_deltas(sd, deltas, strict)?;
    sd.unet.layers().bake()?;
    for enc in sd.text.iter() {
        enc.model.layers().bake()?;
    }
    Ok(warnings)
}

/// [`apply_deltas`] without computing the effective weights for inference: what `merge` needs,
/// which takes each adapted layer's exact effective weight once
/// ([`models::Layers::effective_weights`]) and never runs the model.
pub fn attach_deltas(
    sd: &StableDiffusion,
    deltas: &[(AnyDelta, f64)],
    strict: bool,
) -> Result<Vec<String>> {
    let layers = sd.unet.layers();
    let mut warnings = Vec::new();
    for (delta, weight) in deltas {
        match delta {
            AnyDelta::Atomtune(delta) => {
                let fit = delta.check_base(layers, strict)?;
                if let Some(w) = fit.warning(delta) {
                    warnings.push(w);
                }
                for (name, adapter) in delta.adapters(layers)? {
                    layers.attach(&name, adapter, *weight)?;
                }
                add_token_embedding(sd, delta)?;
            }
            AnyDelta::Kohya(file) => warnings.extend(apply_kohya(sd, file, *weight)?),
        }
    }
    Ok(warnings)
}

/// Makes a delta's trigger a new token read as its learned embedding (pivotal tuning), when it
/// has one. The embedding is used as it is, whatever the delta's weight.
fn add_token_embedding(sd: &StableDiffusion, delta: &atoms::Delta) -> Result<()> {
    if delta.embeddings().is_empty() {
        return Ok(());
    }
    let trigger = delta.meta().trigger.as_deref().unwrap_or_default();
    let rows = models::TextEncoders::NAMES
        .iter()
        .take(sd.text.iter().count())
        .map(|name| {
            let row = delta.embeddings().get(*name).ok_or_else(|| {
                Error::Request(format!(
                    "the delta's token {trigger:?} has no embedding for {name} of `{}`",
                    sd.id
                ))
            })?;
            Ok(row.to_device(sd.unet.device())?)
        })
        .collect::<Result<Vec<_>>>()?;
    sd.text.add_token(trigger, &rows, &sd.id)?;
    Ok(())
}

/// Makes each embedding bundled in a kohya file (`bundle_emb.<name>.*`) a word of the prompt.
fn add_bundled_embeddings(sd: &StableDiffusion, file: &AdapterFile) -> Result<()> {
    let keys: &[&[&str]] = if sd.text.is_dual() {
        &[&["clip_l"], &["clip_g"]]
    } else {
        &[&["string_to_param.*", "clip_l"]]
    };
    for (name, vectors) in &file.embeddings {
        let rows = keys
            .iter()
            .map(|options| {
                let t = options.iter().find_map(|k| vectors.get(*k)).ok_or_else(|| {
                    Error::Request(format!(
                        "the adapter file's embedding {name:?} has no {} vectors for `{}` (it has {:?})",
                        options[0],
                        sd.id,
                        vectors.keys().collect::<Vec<_>>()
                    ))
                })?;
                Ok(t.to_device(sd.unet.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        sd.text.add_token(name, &rows, &sd.id)?;
    }
    Ok(())
}

/// Attaches every module of a kohya / LyCORIS file that names a layer of `sd`, and adds its
/// bundled embeddings.
fn apply_kohya(sd: &StableDiffusion, file: &AdapterFile, weight: f64) -> Result<Vec<String>> {
    add_bundled_embeddings(sd, file)?;
    let targets = models::kohya::module_targets(sd);
    let mut unmatched = Vec::new();
    for module in file.modules.keys() {
        let Some((layers, layer)) = targets.get(module) else {
            unmatched.push(module.clone());
            continue;
        };
        // the weight as stored (an f32 original, where the layer keeps bf16)
        let base = layers.base_weight(layer)?;
        let adapter = file
            .adapter(module, &base)
            .map_err(|e| Error::Request(format!("adapter module `{module}` on `{layer}`: {e}")))?;
        layers.attach(layer, adapter, weight)?;
    }
    let n = file.modules.len();
    if unmatched.len() == n {
        return Err(Error::Request(format!(
            "none of the {n} modules of the adapter file names a layer of `{}` (first: `{}`): is it for another model family?",
            sd.id,
            unmatched.first().map(String::as_str).unwrap_or("")
        )));
    }
    Ok(if unmatched.is_empty() {
        Vec::new()
    } else {
        let shown: Vec<&str> = unmatched.iter().take(5).map(String::as_str).collect();
        vec![format!(
            "{} of {n} adapter modules name no layer of `{}` and are left out: {}{}",
            unmatched.len(),
            sd.id,
            shown.join(", "),
            if unmatched.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )]
    })
}

/// Pixels of a raw decode: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, row-major RGB, per image.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let (b, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(Error::Request(format!("an image has 3 channels, not {c}")));
    }
    let px = ((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let px = (px * 255.0)?.round()?.permute((0, 2, 3, 1))?.contiguous()?;
    let v = px.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..b)
        .map(|i| {
            (
                w,
                h,
                v[i * h * w * 3..(i + 1) * h * w * 3]
                    .iter()
                    .map(|&x| x as u8)
                    .collect(),
            )
        })
        .collect())
}
