//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101) whose
//! state can be saved and restored: candle-nn's keeps its moments private, and an exact resume
//! needs them.
//!
//! For each parameter `p` with gradient `g`, at step `t` (from 1), learning rate `lr`:
//! `p -= lr wd p`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::prodigy::Prodigy;
use crate::Result;

/// AdamW's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The optimizer over a fixed list of parameters.
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    config: AdamWConfig,
}

impl AdamW {
    /// A fresh optimizer (zero moments, step 0).
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The parameters, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with gradients `grads` (missing gradients count as zero), scaled by `scale`
    /// (gradient clipping), at learning rate `lr`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, scale: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, var) in self.vars.iter().enumerate() {
            let g = match &grads[i] {
                Some(g) => (g * scale)?,
                None => var.as_tensor().zeros_like()?,
            };
            let p = var.as_tensor();
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<i>`, `v.<i>` in the parameters' dtype, `step`), for a
    /// checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        saved::write(&[("m", &self.m), ("v", &self.v)], self.step)
    }

    /// Restores a saved state; every shape must fit the parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if state.contains_key("prodigy") {
            return Err(saved::unfit(
                "it is Prodigy's: the checkpoint was made with --optimizer prodigy".into(),
            ));
        }
        self.step = saved::read(
            state,
            &self.vars,
            &mut [("m", &mut self.m), ("v", &mut self.v)],
            0,
        )?;
        Ok(())
    }
}

/// Saving and restoring an optimizer's per-parameter tensors (`<name>.<i>`) and step count, as
/// AdamW and Prodigy both do.
pub(crate) mod saved {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor, Var};

    use crate::{Error, Result};

    /// The error of a saved state that does not fit the parameters.
    pub(crate) fn unfit(reason: String) -> Error {
        Error::Config(format!("optimizer state does not fit: {reason}"))
    }

    /// `lists` as `<name>.<i>` tensors on the CPU, with `step`.
    pub(crate) fn write(
        lists: &[(&str, &[Tensor])],
        step: usize,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, list) in lists {
            for (i, t) in list.iter().enumerate() {
                out.insert(format!("{name}.{i}"), t.to_device(&Device::Cpu)?);
            }
        }
        out.insert("step".into(), Tensor::new(&[step as i64], &Device::Cpu)?);
        Ok(out)
    }

    /// Fills `lists` from `state` (each `<name>.<i>` shaped like `vars[i]`, onto its device and
    /// dtype), which must hold exactly those, `step` and `extra` more; returns the step.
    pub(crate) fn read(
        state: &HashMap<String, Tensor>,
        vars: &[Var],
        lists: &mut [(&str, &mut Vec<Tensor>)],
        extra: usize,
    ) -> Result<usize> {
        if state.len() != lists.len() * vars.len() + 1 + extra {
            return Err(unfit(format!(
                "{} tensors for {} parameters",
                state.len(),
                vars.len()
            )));
        }
        for (name, list) in lists.iter_mut() {
            for (i, var) in vars.iter().enumerate() {
                let t = state
                    .get(&format!("{name}.{i}"))
                    .ok_or_else(|| unfit(format!("no `{name}.{i}`")))?;
                if t.dims() != var.dims() {
                    return Err(unfit(format!(
                        "`{name}.{i}` has shape {:?}, the parameter {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                list[i] = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        let step = state.get("step").ok_or_else(|| unfit("no `step`".into()))?;
        Ok(step
            .flatten_all()?
            .to_vec1::<i64>()?
            .first()
            .copied()
            .unwrap_or(0)
            .max(0) as usize)
    }
}

/// Which optimizer a run uses (`--optimizer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptimizerKind {
    /// AdamW at the run's learning rate.
    #[default]
    AdamW,
    /// Prodigy ([`crate::prodigy`]): AdamW with its step size estimated; the learning rate is a
    /// multiplier of the estimate (1 is usual).
    Prodigy,
}

impl std::fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Prodigy => "prodigy",
        })
    }
}

/// The run's optimizer, whichever it is.
pub enum Optimizer {
    /// AdamW.
    AdamW(AdamW),
    /// Prodigy.
    Prodigy(Prodigy),
}

impl Optimizer {
    /// A fresh optimizer of `kind` over `vars` (Prodigy takes AdamW's betas, eps and decay).
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::AdamW => Optimizer::AdamW(AdamW::new(vars, config)?),
            OptimizerKind::Prodigy => Optimizer::Prodigy(Prodigy::new(vars, config)?),
        })
    }

    /// The parameters, in order.
    pub fn vars(&self) -> &[Var] {
        match self {
            Optimizer::AdamW(o) => o.vars(),
            Optimizer::Prodigy(o) => o.vars(),
        }
    }

    /// One update (see each optimizer's `step`).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, scale: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(grads, lr, scale),
            Optimizer::Prodigy(o) => o.step(grads, lr, scale),
        }
    }

    /// The state as named tensors, for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Optimizer::AdamW(o) => o.state(),
            Optimizer::Prodigy(o) => o.state(),
        }
    }

    /// Restores a saved state.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.load_state(state),
            Optimizer::Prodigy(o) => o.load_state(state),
        }
    }
}

/// The gradients of `vars` in `grads`, in order.
pub fn collect_grads(vars: &[Var], grads: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter().map(|v| grads.get(v).cloned()).collect()
}

/// The global L2 norm of gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter().flatten() {
        // Each tensor's sum of squares on its device in f32 (Metal has no f64), the total on
        // the host in f64.
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps by hand, formula above, against the optimizer.
    #[test]
    fn adamw_matches_the_formula_and_restores_its_state() {
        let p0 = [1.0f64, -2.0];
        let g = [[0.5f64, 0.25], [-1.0, 2.0]];
        let c = AdamWConfig::default();
        let lr = 0.1;
        let (mut p, mut m, mut v) = (p0, [0.0; 2], [0.0; 2]);
        for (t, gt) in g.iter().enumerate() {
            let t = (t + 1) as i32;
            for k in 0..2 {
                p[k] *= 1.0 - lr * c.weight_decay;
                m[k] = c.beta1 * m[k] + (1.0 - c.beta1) * gt[k];
                v[k] = c.beta2 * v[k] + (1.0 - c.beta2) * gt[k] * gt[k];
                let mh = m[k] / (1.0 - c.beta1.powi(t));
                let vh = v[k] / (1.0 - c.beta2.powi(t));
                p[k] -= lr * mh / (vh.sqrt() + c.eps);
            }
        }
        let var = Var::from_slice(&p0, 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], c).unwrap();
        opt.step(&[Some(Tensor::new(&g[0], &Device::Cpu).unwrap())], lr, 1.0)
            .unwrap();
        // save after one step, restore into a fresh optimizer, take the second step there
        let state = opt.state().unwrap();
        let var2 = Var::from_tensor(var.as_tensor()).unwrap();
        let mut opt2 = AdamW::new(vec![var2.clone()], c).unwrap();
        opt2.load_state(&state).unwrap();
        assert_eq!(opt2.step_count(), 1);
        opt2.step(&[Some(Tensor::new(&g[1], &Device::Cpu).unwrap())], lr, 1.0)
            .unwrap();
        let got = var2.as_tensor().to_vec1::<f64>().unwrap();
        for k in 0..2 {
            assert!((got[k] - p[k]).abs() < 1e-12, "{got:?} vs {p:?}");
        }
        // a state for other parameters is refused
        let other = Var::from_slice(&[0.0f64; 3], 3, &Device::Cpu).unwrap();
        let mut opt3 = AdamW::new(vec![other], c).unwrap();
        assert!(opt3.load_state(&state).is_err());
    }
}
