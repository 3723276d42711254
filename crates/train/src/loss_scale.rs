//! Dynamic loss scaling for f16 models (Micikevicius et al., "Mixed Precision Training",
//! arXiv 1710.03740; PyTorch's `GradScaler` does the same).
//!
//! An f16 backward holds gradients in f16, whose smallest normal number is 6e-5 and smallest
//! number 6e-8: the gradients of a diffusion loss, averaged over every latent element, fall
//! below that and become zero. So the loss is multiplied by a large scale before the backward,
//! which lifts every gradient into f16's range, and the adapter gradients (f32) are divided by
//! it before the update. Too large a scale overflows instead: then the step is skipped (the
//! parameters and the optimizer's moments stay as they were) and the scale halves; after
//! `growth_interval` good steps in a row it doubles again. bf16 has f32's exponent range and
//! needs no scale.

use serde::{Deserialize, Serialize};

/// How the scale starts and moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaleConfig {
    /// The first scale.
    pub init: f64,
    /// The factor a scale grows by after `growth_interval` good steps.
    pub growth_factor: f64,
    /// The factor a scale shrinks by after an overflow.
    pub backoff_factor: f64,
    /// Good steps in a row before the scale grows.
    pub growth_interval: usize,
}

impl Default for LossScaleConfig {
    /// PyTorch's `GradScaler` defaults: 2^16, x2 every 2000 good steps, /2 on overflow.
    fn default() -> Self {
        LossScaleConfig {
            init: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The scale now and how many good steps led to it: what a checkpoint keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    /// The scale the next step multiplies its loss by.
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: usize,
}

/// The dynamic loss scale of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    config: LossScaleConfig,
    state: LossScaleState,
}

impl LossScaler {
    /// A scaler at `config.init`.
    pub fn new(config: LossScaleConfig) -> Self {
        LossScaler {
            config,
            state: LossScaleState {
                scale: config.init,
                good_steps: 0,
            },
        }
    }

    /// A scaler where a checkpoint left one.
    pub fn from_state(config: LossScaleConfig, state: LossScaleState) -> Self {
        LossScaler { config, state }
    }

    /// The scale for the next backward.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// What a checkpoint keeps.
    pub fn state(&self) -> LossScaleState {
        self.state
    }

    /// Takes a step's outcome: returns whether its gradients (of the scaled loss) were all
    /// finite, so that the update applies; grows the scale after enough good steps and backs it
    /// off after a bad one.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        let s = &mut self.state;
        if grads_finite {
            s.good_steps += 1;
            if s.good_steps >= self.config.growth_interval {
                let grown = s.scale * self.config.growth_factor;
                if grown.is_finite() {
                    s.scale = grown;
                }
                s.good_steps = 0;
            }
        } else {
            s.scale = (s.scale * self.config.backoff_factor).max(f64::MIN_POSITIVE);
            s.good_steps = 0;
        }
        grads_finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScaler::new(LossScaleConfig {
            growth_interval: 3,
            ..LossScaleConfig::default()
        });
        assert_eq!(s.scale(), 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale(), 32768.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale(), 32768.0);
        assert!(s.update(true));
        assert_eq!(s.scale(), 65536.0);
        // an overflow resets the count of good steps
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        let again = LossScaler::from_state(LossScaleConfig::default(), s.state());
        assert_eq!(again.scale(), s.scale());
    }
}
