//! DPM-Solver++ multistep, second order (Lu et al., "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models", arXiv 2211.01095), with or without Karras sigmas
//! (arXiv 2206.00364), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`.
//!
//! With `lambda = log(alpha / sigma)` and `h = lambda_next - lambda`, the data prediction `x0`
//! is integrated exactly: first order `x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) x0`,
//! second order adds the difference of the last two `x0` (midpoint or Heun form).

use candle_core::Tensor;
use serde_json::Value;

use super::common::{
    interp, karras_sigmas, np_arange_down, np_linspace, sigma_to_t, NoiseSchedule,
};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::Scheduler;
use crate::rng::NoiseRng;
use crate::Result;

/// The DPM-Solver++ scheduler after `set_timesteps`.
pub struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    // state
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of a sigma: `alpha = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma alpha`.
fn alpha_sigma(s: f64) -> (f64, f64) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

impl DpmSolver {
    /// Builds it from a config (DPM-Solver's defaults for absent keys) for `n` steps.
    pub fn new(c: &SchedulerConfig, n: usize) -> Result<Self> {
        c.only("algorithm_type", &[Value::String("dpmsolver++".into())])?;
        c.only("thresholding", &[Value::Bool(false)])?;
        for k in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            c.only(k, &[Value::Bool(false)])?;
        }
        c.only("variance_type", &[])?;
        let order = c.usize_or("solver_order", 2)?;
        if !(1..=2).contains(&order) {
            return Err(c.err(format!(
                "`solver_order` = {order} is not supported (1 or 2)"
            )));
        }
        let heun = match c.str_or("solver_type", "midpoint")?.as_str() {
            "midpoint" => false,
            "heun" => true,
            other => {
                return Err(c.err(format!(
                    "`solver_type` = {other:?} is not supported (midpoint, heun)"
                )))
            }
        };
        let schedule = NoiseSchedule::from_config(c)?;
        let t = schedule.len();
        // lambda_min_clipped cuts the schedule where log(alpha/sigma) falls below it.
        let lambda_min = c.f64_or("lambda_min_clipped", f64::NEG_INFINITY)?;
        let clipped = schedule
            .alphas_cumprod
            .iter()
            .rev()
            .map(|&a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64)
            .take_while(|&l| l < lambda_min)
            .count();
        if clipped >= t {
            return Err(c.err(format!(
                "lambda_min_clipped {lambda_min} clips every one of the {t} training timesteps; lower it"
            )));
        }
        let last = t - clipped;
        let offset = c.usize_or("steps_offset", 0)? as i64;
        let mut ts: Vec<f64> = match c.spacing("linspace")? {
            Spacing::Linspace => np_linspace(0.0, (last - 1) as f64, n + 1)
                .iter()
                .rev()
                .take(n)
                .map(|x| x.round_ties_even())
                .collect(),
            Spacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + offset as f64)
                    .collect()
            }
            Spacing::Trailing => np_arange_down(last as f64, 0.0, -(t as f64 / n as f64))
                .iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        };
        let all = schedule.sigmas();
        let mut sigmas: Vec<f64> = ts.iter().map(|&x| interp(x, &all)).collect();
        if c.bool_or("use_karras_sigmas", false)? {
            let log_sigmas: Vec<f32> = all.iter().map(|s| s.ln()).collect();
            sigmas = karras_sigmas(all[0] as f64, all[t - 1] as f64, n);
            let round = c.str_or("beta_schedule", "linear")? != "squaredcos_cap_v2";
            ts = sigmas
                .iter()
                .map(|&s| {
                    let x = sigma_to_t(s, &log_sigmas);
                    if round {
                        x.round_ties_even()
                    } else {
                        x
                    }
                })
                .collect();
        }
        let final_zero = match c.str_or("final_sigmas_type", "zero")?.as_str() {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(c.err(format!(
                    "`final_sigmas_type` = {other:?} is not supported (zero, sigma_min)"
                )))
            }
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(if final_zero { 0.0 } else { all[0] });
        Ok(DpmSolver {
            // diffusers keeps these as int64: the UNet sees whole numbers
            timesteps: ts.iter().map(|x| x.trunc()).collect(),
            sigmas,
            prediction: c.prediction(&[
                Prediction::Epsilon,
                Prediction::VPrediction,
                Prediction::Sample,
            ])?,
            order,
            heun,
            lower_order_final: c.bool_or("lower_order_final", true)?,
            euler_at_final: c.bool_or("euler_at_final", false)?,
            final_zero,
            outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _rng: &mut NoiseRng) -> Result<Tensor> {
        let n = self.timesteps.len();
        // (diffusers' `lower_order_second` only matters for third order, which is not offered.)
        let lower_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        // the data prediction x0
        let (a_s, s_s) = alpha_sigma(self.sigmas[i] as f64);
        let x0 = match self.prediction {
            Prediction::Epsilon => ((x - (out * s_s)?)? / a_s)?,
            Prediction::VPrediction => ((x * a_s)? - (out * s_s)?)?,
            Prediction::Sample => out.clone(),
        };
        if self.outputs.len() == self.order {
            self.outputs.remove(0);
        }
        self.outputs.push(x0.clone());
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1] as f64);
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let h = lambda(a_t, s_t) - lambda(a_s, s_s);
        let first = self.order == 1 || self.lower_order_nums < 1 || lower_final;
        let prev = if first {
            ((x * (s_t / s_s))? - (&x0 * (a_t * ((-h).exp() - 1.0)))?)?
        } else {
            let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1] as f64);
            let h0 = lambda(a_s, s_s) - lambda(a_s1, s_s1);
            let r0 = h0 / h;
            let (m0, m1) = (
                &self.outputs[self.outputs.len() - 1],
                &self.outputs[self.outputs.len() - 2],
            );
            let d1 = ((m0 - m1)? / r0)?;
            let base = ((x * (s_t / s_s))? - (m0 * (a_t * ((-h).exp() - 1.0)))?)?;
            if self.heun {
                (base + (d1 * (a_t * (((-h).exp() - 1.0) / h + 1.0)))?)?
            } else {
                (base - (d1 * (0.5 * a_t * ((-h).exp() - 1.0)))?)?
            }
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
