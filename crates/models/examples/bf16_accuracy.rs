//! How far SD 1.5's UNet (random weights, real size) lands from its f32 output in bf16 mixed
//! precision (weights kept in bf16, bf16 products with f32 sums), with the 3x3 convs as direct
//! products and as Winograd's F(2x2, 3x3) (`ops::conv::winograd`): the relative root mean
//! square difference of the noise prediction, one image, on CPUs with AVX512-BF16.
//!
//! ```text
//! cargo run --release -p atomtune-models --example bf16_accuracy -- [LATENT]   (default 64)
//! ```

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::{Layers, Preset, Unet, UnetConfig, Weights};

fn main() -> models::Result<()> {
    models::tune_process();
    models::on_compute_thread(run)
}

fn run() -> models::Result<()> {
    if !models::cpu_bf16::supported() {
        eprintln!("this CPU has no AVX512-BF16: nothing to compare");
        return Ok(());
    }
    let latent: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("LATENT: a number"))
        .unwrap_or(64);
    let (dev, preset) = (Device::Cpu, Preset::Sd15);
    let cfg = UnetConfig::parse(
        Path::new(&format!("<{}>/unet/config.json", preset.name())),
        preset.unet_config(),
    )?;
    let build = |bf16: bool| {
        let w = Weights::random(0, DType::F32, &dev).with_bf16_weights(bf16);
        Unet::new(&w.pp("unet"), &cfg, &Layers::new(preset.name()))
    };
    let x = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, cfg.cross_attention_dim), &dev)?;
    let t = Tensor::new(&[500u32], &dev)?;
    models::cpu_bf16::set_enabled(false);
    let want = build(false)?.forward_with(&x, &t, &ctx, None)?;
    let size = want.sqr()?.sum_all()?.to_scalar::<f32>()?;
    models::cpu_bf16::set_enabled(true);
    let unet = build(true)?;
    for (name, winograd) in [("direct", false), ("Winograd", true)] {
        ops::conv::winograd::set_enabled(winograd);
        let got = unet.forward_with(&x, &t, &ctx, None)?;
        let diff = (got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        println!(
            "latent {latent}, bf16 with {name} 3x3 convs: {:.2e} relative rms from f32",
            (diff / size).sqrt()
        );
    }
    Ok(())
}
