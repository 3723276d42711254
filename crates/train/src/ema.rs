//! An exponential moving average of the tuned parameters (`--ema DECAY`): after each optimizer
//! update `ema = decay * ema + (1 - decay) * param`. The delta a run writes holds the average; the
//! checkpoints hold the raw parameters and the average (as `ema.<i>` beside the optimizer's
//! moments), so a resumed run continues bit for bit.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use crate::{Error, Result};

/// The prefix of the average's tensors in a checkpoint's `optimizer.safetensors`.
pub const PREFIX: &str = "ema.";

/// The moving average of a list of parameters.
pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// An average starting at the parameters' current values.
    pub fn new(vars: &[Var], decay: f64) -> Result<Self> {
        Ok(Ema {
            decay,
            // copies: a variable's storage changes in place at every update
            shadow: vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Folds the parameters' current values in.
    pub fn update(&mut self, vars: &[Var]) -> Result<()> {
        for (s, v) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * self.decay)? + (v.as_tensor().detach() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The average as checkpoint tensors (`ema.<i>`, on the CPU).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        self.shadow
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((format!("{PREFIX}{i}"), t.to_device(&Device::Cpu)?)))
            .collect()
    }

    /// Restores the average from a checkpoint's tensors; every parameter needs its own.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, s) in self.shadow.iter_mut().enumerate() {
            let t = state.get(&format!("{PREFIX}{i}")).ok_or_else(|| {
                Error::Config(format!(
                    "the checkpoint has no `{PREFIX}{i}`: it was written without --ema"
                ))
            })?;
            if t.dims() != s.dims() {
                return Err(Error::Config(format!(
                    "`{PREFIX}{i}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
            *s = t.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        Ok(())
    }

    /// Puts the average into `vars` and returns their raw values, for [`Ema::restore`].
    pub fn swap_in(&self, vars: &[Var]) -> Result<Vec<Tensor>> {
        let raw = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (v, s) in vars.iter().zip(&self.shadow) {
            v.set(s)?;
        }
        Ok(raw)
    }

    /// Puts raw values back.
    pub fn restore(vars: &[Var], raw: &[Tensor]) -> Result<()> {
        for (v, r) in vars.iter().zip(raw) {
            v.set(r)?;
        }
        Ok(())
    }
}
