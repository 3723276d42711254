//! Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
//! arXiv 2306.06101), the Adam form of the authors' `prodigyopt` 1.0: AdamW whose step size `d`
//! is estimated from the distance travelled, so the learning rate stays at 1 (a multiplier of
//! the estimate) and need not be tuned.
//!
//! With `d` from the last step, learning rate `lr`, `dlr = d lr` (no bias correction, as the
//! default), `beta3 = sqrt(beta2)`, for each parameter `p` (its start `p0`) with gradient `g`:
//! `num = beta3 num + (d / d0) dlr <g, p0 - p>`; `m = b1 m + d (1 - b1) g`;
//! `v = b2 v + d^2 (1 - b2) g^2`; `s = beta3 s + (d / d0) dlr g`; `den = sum |s|` over all.
//! Then `d_hat = num / den`; `d = max(d, d_hat)` while `d` is still `d0`; `d_max = max(d_max,
//! d_hat)`; `d = min(d_max, d * growth)` with no growth limit, so `d = d_max`. Each parameter: `p -= dlr wd p` (decoupled
//! decay), `p -= dlr m / (sqrt(v) + d eps)`. A step whose gradients are all zero changes
//! nothing. The scalars live on the host in f64 (Metal has no f64).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::optim::{saved, AdamWConfig};
use crate::Result;

/// Prodigy's starting estimate of `d` (the authors' default).
pub const D0: f64 = 1e-6;

/// How much `d` may grow per step (the authors' default: no limit, so `d` is the largest
/// estimate so far).
const GROWTH_RATE: f64 = f64::INFINITY;

/// The optimizer over a fixed list of parameters.
pub struct Prodigy {
    vars: Vec<Var>,
    p0: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    s: Vec<Tensor>,
    d: f64,
    d_max: f64,
    numerator: f64,
    step: usize,
    config: AdamWConfig,
}

/// A tensor's single value, read on the host as f64.
fn host_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

impl Prodigy {
    /// A fresh optimizer (`d = d0`, zero moments, the parameters' current values as `p0`).
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let all_zeros = || {
            vars.iter()
                .map(zeros)
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Prodigy {
            // copies: a variable's storage changes in place at every update
            p0: vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            m: all_zeros()?,
            v: all_zeros()?,
            s: all_zeros()?,
            vars,
            d: D0,
            d_max: D0,
            numerator: 0.0,
            step: 0,
            config,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The current step-size estimate `d`.
    pub fn d(&self) -> f64 {
        self.d
    }

    /// The parameters, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with gradients `grads` (missing ones count as zero) scaled by `scale`, at
    /// learning rate (multiplier) `lr`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, scale: f64) -> Result<()> {
        let c = self.config;
        let beta3 = c.beta2.sqrt();
        let (d, dlr) = (self.d, self.d * lr);
        let mut numerator = self.numerator * beta3;
        let mut denominator = 0f64;
        let (mut m, mut v, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for (i, var) in self.vars.iter().enumerate() {
            let p = var.as_tensor();
            let g = match &grads[i] {
                Some(g) => (g * scale)?,
                None => p.zeros_like()?,
            };
            if lr > 0.0 {
                let dot = host_f64(&(&g * (&self.p0[i] - p)?)?.sum_all()?)?;
                numerator += d / D0 * dlr * dot;
                m.push(((&self.m[i] * c.beta1)? + (&g * (d * (1.0 - c.beta1)))?)?);
                v.push(((&self.v[i] * c.beta2)? + (g.sqr()? * (d * d * (1.0 - c.beta2)))?)?);
                let si = ((&self.s[i] * beta3)? + (&g * (d / D0 * dlr))?)?;
                denominator += host_f64(&si.abs()?.sum_all()?)?;
                s.push(si);
            }
        }
        if denominator == 0.0 {
            // no gradient (or lr 0): nothing moves, as prodigyopt returns early
            return Ok(());
        }
        let d_hat = numerator / denominator;
        let mut d_new = d;
        if d == D0 {
            d_new = d_new.max(d_hat);
        }
        self.d_max = self.d_max.max(d_hat);
        d_new = self.d_max.min(d_new * GROWTH_RATE);
        for (i, var) in self.vars.iter().enumerate() {
            let p = var.as_tensor();
            let den = (v[i].sqrt()? + d_new * c.eps)?;
            let decayed = (p * (1.0 - dlr * c.weight_decay))?;
            var.set(&(decayed - ((&m[i] / den)? * dlr)?)?)?;
        }
        (self.m, self.v, self.s) = (m, v, s);
        self.numerator = numerator;
        self.d = d_new;
        self.step += 1;
        Ok(())
    }

    /// The state as named tensors (`m.<i>`, `v.<i>`, `s.<i>`, `p0.<i>`, `step`, and `prodigy` =
    /// `[d, d_max, numerator]` in f64), for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = saved::write(
            &[
                ("m", &self.m),
                ("v", &self.v),
                ("s", &self.s),
                ("p0", &self.p0),
            ],
            self.step,
        )?;
        out.insert(
            "prodigy".into(),
            Tensor::new(&[self.d, self.d_max, self.numerator], &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a saved state; every shape must fit the parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let scalars = state.get("prodigy").ok_or_else(|| {
            saved::unfit(
                "no `prodigy` scalars: the checkpoint was made with another --optimizer".into(),
            )
        })?;
        let sc = scalars.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let [d, d_max, numerator] = sc[..] else {
            return Err(saved::unfit(format!(
                "`prodigy` holds {} values, not 3",
                sc.len()
            )));
        };
        self.step = saved::read(
            state,
            &self.vars,
            &mut [
                ("m", &mut self.m),
                ("v", &mut self.v),
                ("s", &mut self.s),
                ("p0", &mut self.p0),
            ],
            1,
        )?;
        (self.d, self.d_max, self.numerator) = (d, d_max, numerator);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// prodigyopt 1.0's `step` written out for one parameter vector, in f64.
    struct Reference {
        p: Vec<f64>,
        p0: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        s: Vec<f64>,
        d: f64,
        d_max: f64,
        num: f64,
    }

    impl Reference {
        fn step(&mut self, g: &[f64], lr: f64, c: AdamWConfig) {
            let beta3 = c.beta2.sqrt();
            let (d, dlr) = (self.d, self.d * lr);
            self.num *= beta3;
            let mut den = 0.0;
            for (k, &g) in g.iter().enumerate() {
                self.num += d / D0 * dlr * g * (self.p0[k] - self.p[k]);
                self.m[k] = c.beta1 * self.m[k] + d * (1.0 - c.beta1) * g;
                self.v[k] = c.beta2 * self.v[k] + d * d * (1.0 - c.beta2) * g * g;
                self.s[k] = beta3 * self.s[k] + d / D0 * dlr * g;
                den += self.s[k].abs();
            }
            let d_hat = self.num / den;
            let mut dn = d;
            if d == D0 {
                dn = dn.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            dn = self.d_max.min(dn * f64::INFINITY);
            for k in 0..g.len() {
                self.p[k] -= dlr * c.weight_decay * self.p[k];
                self.p[k] -= dlr * self.m[k] / (self.v[k].sqrt() + dn * c.eps);
            }
            self.d = dn;
        }
    }

    /// Five steps against the formulas, saving and restoring the state half-way; `d` must grow
    /// from `d0` (the point of the method).
    #[test]
    fn prodigy_matches_the_reference_and_restores_its_state() {
        let p0 = vec![1.0f64, -2.0, 0.5];
        let gs = [
            [0.5, 0.25, -0.1],
            [0.4, 0.3, -0.2],
            [0.45, 0.2, -0.15],
            [0.3, 0.25, -0.1],
            [0.35, 0.1, -0.05],
        ];
        let c = AdamWConfig::default();
        let mut r = Reference {
            p: p0.clone(),
            p0: p0.clone(),
            m: vec![0.0; 3],
            v: vec![0.0; 3],
            s: vec![0.0; 3],
            d: D0,
            d_max: D0,
            num: 0.0,
        };
        let dev = Device::Cpu;
        let var = Var::from_slice(&p0, 3, &dev).unwrap();
        let mut opt = Prodigy::new(vec![var.clone()], c).unwrap();
        let mut var_now = var;
        for (k, g) in gs.iter().enumerate() {
            r.step(g, 1.0, c);
            if k == 2 {
                let state = opt.state().unwrap();
                var_now = Var::from_tensor(&var_now.as_tensor().copy().unwrap()).unwrap();
                opt = Prodigy::new(vec![var_now.clone()], c).unwrap();
                opt.load_state(&state).unwrap();
                assert_eq!(opt.step_count(), 2);
            }
            let g = Tensor::new(g, &dev).unwrap();
            opt.step(&[Some(g)], 1.0, 1.0).unwrap();
            let got = var_now.as_tensor().to_vec1::<f64>().unwrap();
            for i in 0..3 {
                assert!(
                    (got[i] - r.p[i]).abs() <= 1e-12 * (1.0 + r.p[i].abs()),
                    "step {k}: {got:?} vs {:?}",
                    r.p
                );
            }
            assert!(
                (opt.d() - r.d).abs() <= 1e-9 * r.d,
                "{} vs {}",
                opt.d(),
                r.d
            );
        }
        assert!(opt.d() > 10.0 * D0, "d stayed at {}", opt.d());
        // a zero gradient moves nothing
        let before = var_now.as_tensor().to_vec1::<f64>().unwrap();
        let mut fresh = Prodigy::new(vec![var_now.clone()], c).unwrap();
        fresh.step(&[None], 1.0, 1.0).unwrap();
        assert_eq!(var_now.as_tensor().to_vec1::<f64>().unwrap(), before);
        // an AdamW state is refused, naming the cause
        let adam = crate::AdamW::new(vec![var_now.clone()], c).unwrap();
        let e = fresh.load_state(&adam.state().unwrap()).unwrap_err();
        assert!(e.to_string().contains("--optimizer"), "{e}");
    }
}
