//! The model families atomtune reads, as deltas record them: a delta fits only the family it was
//! trained on (its layer names and shapes are that family's).

use std::fmt;
use std::path::Path;

use crate::config::{ClipActivation, ClipConfig, UnetConfig};
use crate::Result;

/// A Stable Diffusion family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: one OpenAI CLIP text encoder (quick GELU).
    Sd1,
    /// SD 2.x: one OpenCLIP text encoder (exact GELU).
    Sd2,
    /// SDXL: two text encoders and the UNet's added text/time conditioning.
    Sdxl,
}

impl Architecture {
    /// Every family.
    pub const ALL: [Architecture; 3] = [Architecture::Sd1, Architecture::Sd2, Architecture::Sdxl];

    /// The family of a UNet and its (first) text encoder: SDXL when the UNet has the added
    /// `text_time` conditioning, else SD 2.x when the text encoder is OpenCLIP's (exact GELU),
    /// else SD 1.x. Read from the configs, so tiny test models of a family are that family.
    pub fn of(unet: &UnetConfig, text: &ClipConfig) -> Self {
        if unet.addition.is_some() {
            Architecture::Sdxl
        } else if text.hidden_act == ClipActivation::Gelu {
            Architecture::Sd2
        } else {
            Architecture::Sd1
        }
    }

    /// The family of the diffusers folder `dir`, read from its `unet/` and `text_encoder/`
    /// configs; `None` when they are not there (a bare UNet weights file).
    pub fn of_folder(dir: &Path) -> Result<Option<Self>> {
        let (unet, text) = (
            dir.join("unet/config.json"),
            dir.join("text_encoder/config.json"),
        );
        if !unet.is_file() || !text.is_file() {
            return Ok(None);
        }
        Ok(Some(Self::of(
            &UnetConfig::read(&unet)?,
            &ClipConfig::read(&text)?,
        )))
    }

    /// The name deltas record: `sd1`, `sd2`, `sdxl`.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Sd1 => "sd1",
            Architecture::Sd2 => "sd2",
            Architecture::Sdxl => "sdxl",
        }
    }

    /// The family a recorded name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// How users call it: `SD 1.x`, `SD 2.x`, `SDXL`.
    pub fn label(&self) -> &'static str {
        match self {
            Architecture::Sd1 => "SD 1.x",
            Architecture::Sd2 => "SD 2.x",
            Architecture::Sdxl => "SDXL",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
