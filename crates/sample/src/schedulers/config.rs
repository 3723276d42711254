//! Scheduler configs, read the way diffusers' `from_config` reads them: keys a scheduler does not
//! know are ignored, keys it needs but the file lacks take that scheduler's own defaults, and keys
//! the file lists in `_use_default_values` count as absent (they were defaults of the scheduler
//! that saved the file, not choices). Known keys whose value selects an option we do not
//! implement are an error naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// What a model output is (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise.
    Epsilon,
    /// `v = sqrt(abar) eps - sqrt(1 - abar) x0` (SD 2.x 768).
    VPrediction,
    /// The clean sample.
    Sample,
}

/// How inference timesteps are spread (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Multiples of `T / n` from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `T / n` ending at `T - 1`.
    Trailing,
    /// Evenly from 0 to `T - 1`.
    Linspace,
}

/// A scheduler config file's entries.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    path: PathBuf,
    map: BTreeMap<String, Value>,
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` text (`path` names it in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::SchedulerConfig {
            path: path.into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = v else {
            return Err(Error::SchedulerConfig {
                path: path.into(),
                reason: "not a JSON object".into(),
            });
        };
        let defaults: Vec<String> = obj
            .get("_use_default_values")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let map = obj
            .into_iter()
            .filter(|(k, v)| !k.starts_with('_') && !v.is_null() && !defaults.contains(k))
            .collect();
        Ok(SchedulerConfig {
            path: path.into(),
            map,
        })
    }

    /// The same config with `key` set (as `from_config(config, key=value)` does).
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.map.insert(key.to_string(), value);
        self
    }

    /// The class that saved the file, if it says.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> Error {
        Error::SchedulerConfig {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn bad(&self, key: &str, want: &str) -> Error {
        self.err(format!("`{key}` should be {want}, found {}", self.map[key]))
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.map.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(String::from)
                .ok_or_else(|| self.bad(key, "a string")),
        }
    }

    /// Errors unless `key` is absent or has its default `value`: an option we do not implement.
    pub(crate) fn only(&self, key: &str, allowed: &[Value]) -> Result<()> {
        match self.map.get(key) {
            Some(v) if !allowed.contains(v) => Err(self.err(format!(
                "`{key}` = {v} is not supported (supported: {})",
                list(allowed)
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) fn prediction(&self, allowed: &[Prediction]) -> Result<Prediction> {
        let p = match self.str_or("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => {
                return Err(self.err(format!("`prediction_type` = {other:?} is not supported")))
            }
        };
        if !allowed.contains(&p) {
            return Err(self.err(format!(
                "`prediction_type` {p:?} is not supported by this scheduler"
            )));
        }
        Ok(p)
    }

    pub(crate) fn spacing(&self, default: &str) -> Result<Spacing> {
        match self.str_or("timestep_spacing", default)?.as_str() {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(self.err(format!(
                "`timestep_spacing` = {other:?} is not supported (leading, trailing, linspace)"
            ))),
        }
    }

    pub(crate) fn trained_betas(&self) -> Result<Option<Vec<f64>>> {
        match self.map.get("trained_betas") {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| self.bad("trained_betas", "a list of numbers"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.bad("trained_betas", "a list of numbers")),
        }
    }
}

fn list(v: &[Value]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
