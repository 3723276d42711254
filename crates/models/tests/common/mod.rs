//! What the UNet parity test binaries share: the fixtures, their reference outputs, the UNet
//! loaded from them, a relative error.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use models::{Layers, Unet, UnetConfig, Weights};

pub fn fixture(name: &str) -> Option<PathBuf> {
    testutil::fixture(name, &["unet", "reference.safetensors"])
}

pub fn reference(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

pub fn load_unet(dir: &std::path::Path) -> Unet {
    load_unet_with(dir, false)
}

/// [`load_unet`], with conv and linear weights kept in bf16 when `bf16_weights`.
pub fn load_unet_with(dir: &std::path::Path, bf16_weights: bool) -> Unet {
    let cfg = UnetConfig::read(&dir.join("unet/config.json")).unwrap();
    let w = Weights::from_files(
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .with_bf16_weights(bf16_weights);
    let unet = Unet::new(&w, &cfg, &Layers::new(dir.display().to_string())).unwrap();
    w.check_all_used().unwrap();
    unet
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let d = (&a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / s.max(1e-12)
}
