//! Learning-rate schedules with linear warm-up.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The shape of the schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrSchedule {
    /// The same rate throughout.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Half a cosine down to zero at the last step.
    Cosine,
}

impl LrSchedule {
    /// The rate at `step` (0-based) of `total`, peak `lr`, after `warmup` steps of linear ramp.
    pub fn at(&self, step: usize, total: usize, lr: f64, warmup: usize) -> f64 {
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::Linear => lr * (1.0 - progress),
            LrSchedule::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    /// The name users type.
    pub fn name(&self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LrSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "linear" => Ok(LrSchedule::Linear),
            "cosine" => Ok(LrSchedule::Cosine),
            _ => Err(Error::Config(format!(
                "unknown --lr-schedule `{s}` (constant, linear, cosine)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_follow_their_shape() {
        let s = LrSchedule::Cosine;
        assert_eq!(s.at(0, 100, 1.0, 10), 0.1);
        assert_eq!(s.at(9, 100, 1.0, 10), 1.0);
        assert_eq!(s.at(10, 100, 1.0, 10), 1.0);
        assert!((s.at(55, 100, 1.0, 10) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::Linear.at(100, 100, 1.0, 0).abs() < 1e-12);
        assert!((LrSchedule::Linear.at(50, 100, 2.0, 0) - 1.0).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.at(99, 100, 3.0, 0), 3.0);
    }
}
