//! What every scheduler shares: the training noise schedule and the ways to pick inference
//! timesteps and sigmas. Arithmetic follows diffusers' own dtypes (the schedule in f32 as torch
//! computes it, timestep and sigma interpolation in f64 as numpy does) so that schedules match.

use super::config::{SchedulerConfig, Spacing};
use crate::Result;

/// The training noise schedule `alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`, f32.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// `alpha_bar_t` for `t = 0..T`.
    pub alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, n, dtype=float32)`: f32 arithmetic, symmetric halves.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`), in f64.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in f32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let mut sqrt_ab: Vec<f32> = betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            (acc as f32).sqrt()
        })
        .collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    for x in sqrt_ab.iter_mut() {
        *x = (*x - last) * (first / (first - last));
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|x| x * x).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

impl NoiseSchedule {
    /// The schedule of a config, with the scheduler's own defaults for absent keys (every
    /// diffusers scheduler defaults to `linear` 0.0001..0.02 over 1000 steps).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let n = c.usize_or("num_train_timesteps", 1000)?;
        if n < 2 {
            return Err(c.err("`num_train_timesteps` must be at least 2"));
        }
        let betas: Vec<f32> = match c.trained_betas()? {
            Some(b) => {
                if b.len() != n {
                    return Err(c.err(format!("{} trained_betas for {n} train timesteps", b.len())));
                }
                b.iter().map(|&x| x as f32).collect()
            }
            None => {
                let (start, end) = (c.f64_or("beta_start", 0.0001)?, c.f64_or("beta_end", 0.02)?);
                match c.str_or("beta_schedule", "linear")?.as_str() {
                    "linear" => torch_linspace_f32(start, end, n),
                    "scaled_linear" => torch_linspace_f32(start.sqrt(), end.sqrt(), n).iter().map(|x| x * x).collect(),
                    "squaredcos_cap_v2" => cosine_betas(n),
                    other => {
                        return Err(c.err(format!(
                            "`beta_schedule` = {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
                        )))
                    }
                }
            }
        };
        let betas = if c.bool_or("rescale_betas_zero_snr", false)? {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        // torch's CPU cumprod accumulates float in double (`acc_type`), rounding each output.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(NoiseSchedule { alphas_cumprod })
    }

    /// `T`, the number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `alpha_bar` at integer timestep `t`; `final_value` before the start (`t < 0`).
    pub fn alpha_bar(&self, t: i64, final_value: f32) -> f32 {
        if t < 0 {
            final_value
        } else {
            self.alphas_cumprod[t as usize]
        }
    }

    /// `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`, f32, ascending in `t`.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `np.linspace(start, end, n)` (f64, exact end point).
pub(crate) fn np_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = end;
    v
}

/// `np.arange(start, stop, step)` for a negative float step.
pub(crate) fn np_arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + i as f64 * step).collect()
}

/// Integer inference timesteps, descending, as DDIM and DDPM pick them.
pub(crate) fn spaced_timesteps(spacing: Spacing, t: usize, n: usize, offset: usize) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|i| (i * ratio + offset) as i64).collect()
        }
        Spacing::Trailing => np_arange_down(t as f64, 0.0, -(t as f64 / n as f64))
            .iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma interpolates `sigma`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // the last index whose log-sigma is <= log_sigma (log-sigmas ascend), clipped to n - 2
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low_idx = count.saturating_sub(1).min(n - 2);
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[low_idx + 1] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Karras et al. (2022) sigmas from `sigma_max` down to `sigma_min`, `rho = 7`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_numpy_on_known_cases() {
        assert_eq!(
            spaced_timesteps(Spacing::Leading, 1000, 4, 1),
            vec![751, 501, 251, 1]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Trailing, 1000, 6, 0),
            vec![999, 832, 666, 499, 332, 166]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 4, 0),
            vec![999, 666, 333, 0]
        );
        // np.round rounds half to even: linspace(0, 999, 3) = [0, 499.5, 999] -> 500 (even).
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 3, 0),
            vec![999, 500, 0]
        );
        // ...and linspace(0, 999, 5)[1] = 249.75 -> 250, [3] = 749.25 -> 749.
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 5, 0),
            vec![999, 749, 500, 250, 0]
        );
    }

    #[test]
    fn interpolation_and_sigma_to_t_invert_each_other() {
        let fp: Vec<f32> = (0..10).map(|i| (i as f32 + 1.0).powi(2)).collect();
        assert_eq!(interp(2.5, &fp), (9.0 + 16.0) / 2.0);
        let logs: Vec<f32> = fp.iter().map(|x| x.ln()).collect();
        // 12.25 lies between fp[2] = 9 and fp[3] = 16: interpolated in log space.
        let w = (9f64.ln() - 12.25f64.ln()) / (9f64.ln() - 16f64.ln());
        let t = sigma_to_t(12.25, &logs);
        assert!((t - (2.0 + w)).abs() < 1e-6, "{t}");
        assert_eq!(sigma_to_t(1e6, &logs), 9.0);
        assert_eq!(sigma_to_t(1e-6, &logs), 0.0);
    }
}
