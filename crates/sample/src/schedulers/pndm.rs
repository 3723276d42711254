//! PNDM (Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds",
//! arXiv 2202.09778), as diffusers' `PNDMScheduler`: Runge-Kutta warm-up steps (unless
//! `skip_prk_steps`, the SD 1.5 setting), then linear multistep (PLMS) steps over past noise
//! predictions.

use candle_core::Tensor;

use super::common::{np_arange_down, np_linspace, NoiseSchedule};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::Scheduler;
use crate::rng::NoiseRng;
use crate::Result;

/// The PNDM scheduler after `set_timesteps`.
pub struct Pndm {
    schedule: NoiseSchedule,
    n: usize,
    t: usize,
    prk: Vec<i64>,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f64>,
    final_alpha: f32,
    prediction: Prediction,
    skip_prk: bool,
    // state
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    /// Builds it from a config (PNDM's defaults for absent keys) for `n` steps.
    pub fn new(c: &SchedulerConfig, n: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(c)?;
        let t = schedule.len();
        let offset = c.usize_or("steps_offset", 0)? as i64;
        // ascending base timesteps
        let base: Vec<i64> = match c.spacing("leading")? {
            Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .iter()
                .map(|x| x.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => (0..n).map(|i| (i * (t / n)) as i64 + offset).collect(),
            Spacing::Trailing => {
                let mut v: Vec<i64> = np_arange_down(t as f64, 0.0, -(t as f64 / n as f64))
                    .iter()
                    .map(|x| x.round_ties_even() as i64 - 1)
                    .collect();
                v.reverse();
                v
            }
        };
        let skip_prk = c.bool_or("skip_prk_steps", false)?;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                return Err(c.err(format!(
                    "PNDM with Runge-Kutta warm-up needs at least 4 steps, not {n}"
                )));
            }
            let half = (t / n / 2) as i64;
            let mut rep = Vec::new();
            for &x in &base[n - 4..] {
                rep.push(x);
                rep.push(x + half);
            }
            let mut doubled = Vec::new();
            for &x in &rep[..rep.len() - 1] {
                doubled.push(x);
                doubled.push(x);
            }
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps_i: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        Ok(Pndm {
            final_alpha: if c.bool_or("set_alpha_to_one", false)? {
                1.0
            } else {
                schedule.alphas_cumprod[0]
            },
            prediction: c.prediction(&[Prediction::Epsilon, Prediction::VPrediction])?,
            timesteps: timesteps_i.iter().map(|&x| x as f64).collect(),
            timesteps_i,
            prk,
            n,
            t,
            skip_prk,
            schedule,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the paper.
    fn prev_sample(&self, x: &Tensor, t: i64, prev: i64, out: &Tensor) -> Result<Tensor> {
        let a = self.schedule.alpha_bar(t, self.final_alpha) as f64;
        let ap = self.schedule.alpha_bar(prev, self.final_alpha) as f64;
        let (b, bp) = (1.0 - a, 1.0 - ap);
        let out = match self.prediction {
            Prediction::VPrediction => ((out * a.sqrt())? + (x * b.sqrt())?)?,
            _ => out.clone(),
        };
        let sample_coeff = (ap / a).sqrt();
        let denom = a * bp.sqrt() + (a * b * ap).sqrt();
        Ok(((x * sample_coeff)? - (out * ((ap - a) / denom))?)?)
    }

    fn step_prk(&mut self, out: &Tensor, t: i64, x: &Tensor) -> Result<Tensor> {
        let half = (self.t / self.n / 2) as i64;
        let diff = if self.counter % 2 == 1 { 0 } else { half };
        let prev = t - diff;
        let t = self.prk[self.counter / 4 * 4];
        let add = |acc: &Option<Tensor>, y: Tensor| -> Result<Tensor> {
            Ok(match acc {
                Some(a) => (a + y)?,
                None => y,
            })
        };
        let out = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(add(&self.cur_model_output, (out / 6.0)?)?);
                self.ets.push(out.clone());
                self.cur_sample = Some(x.clone());
                out.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(add(&self.cur_model_output, (out / 3.0)?)?);
                out.clone()
            }
            _ => {
                let o = add(&self.cur_model_output, (out / 6.0)?)?;
                self.cur_model_output = None;
                o
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| x.clone());
        let prev_sample = self.prev_sample(&cur, t, prev, &out)?;
        self.counter += 1;
        Ok(prev_sample)
    }

    fn step_plms(&mut self, out: &Tensor, t: i64, x: &Tensor) -> Result<Tensor> {
        let stride = (self.t / self.n) as i64;
        let (mut t, mut prev) = (t, t - stride);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(out.clone());
        } else {
            prev = t;
            t += stride;
        }
        let e = &self.ets;
        let mut x = x.clone();
        let out = if e.len() == 1 && self.counter == 0 {
            self.cur_sample = Some(x.clone());
            out.clone()
        } else if e.len() == 1 && self.counter == 1 {
            x = self.cur_sample.take().unwrap_or(x);
            ((out + &e[0])? / 2.0)?
        } else if e.len() == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if e.len() == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            let s = ((((&e[3] * 55.0)? - (&e[2] * 59.0)?)? + (&e[1] * 37.0)?)? - (&e[0] * 9.0)?)?;
            (s / 24.0)?
        };
        let prev_sample = self.prev_sample(&x, t, prev, &out)?;
        self.counter += 1;
        Ok(prev_sample)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _rng: &mut NoiseRng) -> Result<Tensor> {
        let t = self.timesteps_i[i];
        if self.counter < self.prk.len() && !self.skip_prk {
            self.step_prk(out, t, x)
        } else {
            self.step_plms(out, t, x)
        }
    }
}
