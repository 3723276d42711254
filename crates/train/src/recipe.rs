//! Training recipes users reach for first (kohya, diffusers' scripts): Min-SNR loss weighting,
//! offset noise, caption dropout, an EMA of the tuned parameters ([`crate::ema`]), masked loss,
//! the Prodigy optimizer ([`crate::prodigy`]). Each is off by default, and a run without them draws the same
//! random numbers as before they existed.

use candle_core::{DType, Device, Tensor};
use sample::schedulers::{NoiseSchedule, Prediction};
use sample::NoiseRng;

use crate::{Error, Result};

/// The recipe options of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Recipe {
    /// Min-SNR weighting's gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    /// Weighting Strategy"): each example's loss times `min(SNR, gamma) / SNR` for epsilon
    /// prediction, `/ (SNR + 1)` for v-prediction, `min(SNR, gamma)` for sample prediction.
    pub min_snr_gamma: Option<f64>,
    /// Offset noise: the noise gets `noise_offset` times a per-channel constant drawn per
    /// example (as diffusers' scripts: `noise += offset * randn(b, c, 1, 1)`).
    pub noise_offset: f64,
    /// The probability that an example's caption is replaced by the empty text.
    pub caption_dropout: f64,
    /// The decay of an exponential moving average of the tuned parameters, written as the delta
    /// ([`crate::ema`]).
    pub ema: Option<f64>,
    /// The loss counts only where each image's mask says (`name.mask.png` beside it, white =
    /// learn, or its alpha channel), averaged over the mask on the latent grid.
    pub masked_loss: bool,
    /// The optimizer.
    pub optimizer: crate::OptimizerKind,
    /// Photos keep their aspect ratio in buckets ([`crate::buckets`]), batches drawn within one.
    pub aspect_buckets: bool,
    /// Pivotal tuning, at this learning rate: the trigger becomes a new token of every
    /// tokenizer whose embedding row (one per text encoder, started at the class word's) trains
    /// with the adapters and is stored in the delta.
    pub token_embedding_lr: Option<f64>,
}

impl Recipe {
    /// Checks ranges; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if self
            .min_snr_gamma
            .is_some_and(|g| !(g > 0.0 && g.is_finite()))
        {
            return Err(Error::Config(
                "--min-snr-gamma must be a number > 0 (5 is usual)".into(),
            ));
        }
        if !(self.noise_offset >= 0.0 && self.noise_offset.is_finite()) {
            return Err(Error::Config(
                "--noise-offset must be a number >= 0 (0.05-0.1 is usual)".into(),
            ));
        }
        if self.ema.is_some_and(|d| !(d > 0.0 && d < 1.0)) {
            return Err(Error::Config(
                "--ema must be a decay in (0, 1) (0.999 is usual)".into(),
            ));
        }
        if self
            .token_embedding_lr
            .is_some_and(|lr| !(lr >= 0.0 && lr.is_finite()))
        {
            return Err(Error::Config(
                "--embedding-lr must be a finite number >= 0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return Err(Error::Config(
                "--caption-dropout must be a probability in [0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// Whether every option is off.
    pub fn is_default(&self) -> bool {
        *self == Recipe::default()
    }

    /// The options that are on, as `(metadata key, value)`.
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(g) = self.min_snr_gamma {
            v.push(("min_snr_gamma", g.to_string()));
        }
        if self.noise_offset > 0.0 {
            v.push(("noise_offset", self.noise_offset.to_string()));
        }
        if self.caption_dropout > 0.0 {
            v.push(("caption_dropout", self.caption_dropout.to_string()));
        }
        if let Some(d) = self.ema {
            v.push(("ema", d.to_string()));
        }
        if self.masked_loss {
            v.push(("masked_loss", "true".into()));
        }
        if self.aspect_buckets {
            v.push(("aspect_buckets", "true".into()));
        }
        if let Some(lr) = self.token_embedding_lr {
            v.push(("train_token_embedding", "true".into()));
            v.push(("embedding_lr", lr.to_string()));
        }
        if self.optimizer != crate::OptimizerKind::AdamW {
            v.push(("optimizer", self.optimizer.to_string()));
        }
        v
    }

    /// The training noise of a batch shaped like `x0 [b, c, h, w]`: standard normal, plus the
    /// offset when it is on (drawn only then).
    pub fn noise(&self, rng: &mut NoiseRng, x0: &Tensor) -> Result<Tensor> {
        let eps = rng.randn(x0.dims(), DType::F32, x0.device())?;
        if self.noise_offset <= 0.0 {
            return Ok(eps);
        }
        let (b, c, _, _) = x0.dims4()?;
        let offset = rng.randn(&[b, c, 1, 1], DType::F32, x0.device())?;
        Ok(eps.broadcast_add(&(offset * self.noise_offset)?)?)
    }

    /// Whether this example's caption is dropped (draws only when dropout is on).
    pub fn drop_caption(&self, rng: &mut NoiseRng) -> bool {
        self.caption_dropout > 0.0 && rng.unit() < self.caption_dropout
    }

    /// Each example's loss weight at its timestep, `[n]` f32 on `device`; `None` without
    /// Min-SNR.
    pub fn loss_weights(
        &self,
        schedule: &NoiseSchedule,
        prediction: Prediction,
        t: &[usize],
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let Some(gamma) = self.min_snr_gamma else {
            return Ok(None);
        };
        let w: Vec<f32> = t
            .iter()
            .map(|&t| min_snr_weight(schedule.alphas_cumprod[t] as f64, gamma, prediction) as f32)
            .collect();
        Ok(Some(Tensor::new(w.as_slice(), device)?))
    }
}

/// Min-SNR's weight at `alpha_bar` (SNR = alpha_bar / (1 - alpha_bar)).
pub fn min_snr_weight(alpha_bar: f64, gamma: f64, prediction: Prediction) -> f64 {
    let snr = alpha_bar / (1.0 - alpha_bar);
    let clipped = snr.min(gamma);
    match prediction {
        Prediction::Epsilon => clipped / snr,
        Prediction::VPrediction => clipped / (snr + 1.0),
        Prediction::Sample => clipped,
    }
}
