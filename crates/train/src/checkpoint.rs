//! Checkpoints: everything a run needs to continue bit for bit, in one folder per step,
//! `OUT/checkpoints/step-NNNNNN/`:
//!
//! - `delta.safetensors`: the adapters (a regular delta file, usable as is);
//! - `optimizer.safetensors`: AdamW's moments and step;
//! - `state.json`: the step, the random generator's position, the data order, and a fingerprint
//!   of the settings that must not change across a resume.
//!
//! A checkpoint is written to a temporary folder and renamed into place: a killed run leaves the
//! previous checkpoints intact and no half-written one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use atoms::Delta;
use candle_core::{Device, Tensor};
use sample::RngState;
use serde::{Deserialize, Serialize};

use crate::loss_scale::LossScaleState;
use crate::{Error, Result};

/// The loop's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    /// The generator's seed.
    pub rng_seed: u64,
    /// The generator's word position (a decimal string: it is a 128-bit number).
    pub rng_word_pos: String,
    /// This epoch's order of example indices.
    pub order: Vec<usize>,
    /// The next position in `order`.
    pub pos: usize,
    /// [`crate::TrainConfig::fingerprint`] of the run.
    pub fingerprint: String,
    /// The dynamic loss scale, for f16 models (checkpoints of other runs have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaleState>,
}

impl LoopState {
    /// The generator position.
    pub fn rng(&self) -> Result<RngState> {
        Ok(RngState {
            seed: self.rng_seed,
            word_pos: self.rng_word_pos.parse().map_err(|_| {
                Error::Config(format!(
                    "bad generator position `{}` in state.json",
                    self.rng_word_pos
                ))
            })?,
        })
    }
}

/// The folder of checkpoint `step` under `root`.
pub fn dir_of(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// Writes a checkpoint atomically; returns its folder.
pub fn write(
    root: &Path,
    delta: &Delta,
    optimizer: &HashMap<String, Tensor>,
    state: &LoopState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let dst = dir_of(root, state.step);
    let tmp = root.join(format!(
        ".tmp-step-{:06}-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    delta.write(&tmp.join("delta.safetensors"))?;
    candle_core::safetensors::save(optimizer, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), json)
        .map_err(|e| Error::io(tmp.join("state.json"), e))?;
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    Ok(dst)
}

/// The checkpoint with the highest step under `root`, if any.
pub fn latest(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// A checkpoint's contents.
pub struct Checkpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// The adapters.
    pub delta: Delta,
    /// AdamW's state.
    pub optimizer: HashMap<String, Tensor>,
    /// The loop's state.
    pub state: LoopState,
}

/// Reads a checkpoint folder.
pub fn read(dir: &Path) -> Result<Checkpoint> {
    let bad = |reason: String| Error::Checkpoint {
        path: dir.into(),
        reason,
    };
    for f in ["delta.safetensors", "optimizer.safetensors", "state.json"] {
        if !dir.join(f).is_file() {
            return Err(bad(format!("missing {f} (is this a checkpoint folder?)")));
        }
    }
    let delta = Delta::read(&dir.join("delta.safetensors"))?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
        .map_err(|e| bad(format!("optimizer.safetensors: {e}")))?;
    let text = std::fs::read_to_string(dir.join("state.json"))
        .map_err(|e| Error::io(dir.join("state.json"), e))?;
    let state: LoopState =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    Ok(Checkpoint {
        dir: dir.into(),
        delta,
        optimizer,
        state,
    })
}
