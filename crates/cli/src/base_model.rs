//! Finding a base model's UNet weights on disk.
//!
//! Until the model stack loads whole pipelines (and hub ids), `--base` takes a local diffusers
//! folder or a UNet `.safetensors` file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use atoms::SafetensorsBase;
use candle_core::Device;

const UNET_FILES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// The UNet weights file of `model`: the file itself, or `unet/` (or the folder itself) of a
/// diffusers folder, preferring full precision.
pub fn unet_file(model: &Path) -> Result<PathBuf> {
    if model.is_file() {
        if model.extension().is_some_and(|e| e == "safetensors") {
            return Ok(model.to_path_buf());
        }
        bail!(
            "{}: only .safetensors weights are read (a .bin/.ckpt pickle can run code when loaded; convert it, e.g. with diffusers' `save_pretrained(..., safe_serialization=True)`)",
            model.display()
        );
    }
    if !model.is_dir() {
        bail!(
            "{}: no such file or folder (give a diffusers model folder or a UNet .safetensors file)",
            model.display()
        );
    }
    for dir in [model.join("unet"), model.to_path_buf()] {
        for f in UNET_FILES {
            let p = dir.join(f);
            if p.is_file() {
                return Ok(p);
            }
        }
        if dir.join("diffusion_pytorch_model.bin").is_file() {
            bail!(
                "{}: the UNet is only a pickle (diffusion_pytorch_model.bin); convert it to safetensors, e.g. with diffusers' `save_pretrained(..., safe_serialization=True)`",
                dir.display()
            );
        }
    }
    bail!(
        "{}: no UNet weights found (expected unet/diffusion_pytorch_model.safetensors in a diffusers folder)",
        model.display()
    )
}

/// The UNet weights of `model`, memory-mapped, for checking and applying deltas; with the
/// model's family when `model` is a diffusers folder.
pub fn open_unet(model: &Path) -> Result<SafetensorsBase> {
    let file = unet_file(model)?;
    let arch = if model.is_dir() {
        models::Architecture::of_folder(model)?.map(|a| a.name().to_string())
    } else {
        None
    };
    Ok(
        SafetensorsBase::open(&file, model.display().to_string(), &Device::Cpu)
            .with_context(|| format!("reading base model {}", model.display()))?
            .with_architecture(arch),
    )
}
