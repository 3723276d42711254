//! Single-file checkpoints (original LDM layout) against their diffusers folder:
//! `../shared/fixtures/single-file/tiny-sd15-shape.safetensors` is the tiny-sd15-shape fixture
//! written in that layout (and proven by diffusers' own `from_single_file`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use models::{Architecture, LoadOptions, StableDiffusion};

fn paths() -> Option<(PathBuf, PathBuf)> {
    let file = testutil::shared_path("fixtures/single-file/tiny-sd15-shape.safetensors")?;
    let dir = testutil::shared_path("fixtures/tiny-sd15-shape")?;
    Some((file, dir))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_single_file_loads_to_its_folders_exact_weights() {
    let Some((file, dir)) = paths() else { return };
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        ..LoadOptions::default()
    };
    let single = StableDiffusion::load(file.to_str().unwrap(), &opts).unwrap();
    let folder = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(single.architecture, Architecture::Sd1);
    let (a, b) = (single.unet.layers(), folder.unet.layers());
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let d = max_diff(&a.get(&name).unwrap().weight, &b.get(&name).unwrap().weight);
        assert_eq!(d, 0.0, "{name}");
    }
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    // the VAE (its attention read from 1x1 convs) and the text encoder give the same outputs
    let (x, y) = (
        single.vae.decode(&r["vae.latent"]).unwrap(),
        folder.vae.decode(&r["vae.latent"]).unwrap(),
    );
    assert_eq!(max_diff(&x, &y), 0.0);
    let (x, _) = single.encode(&["a photo of sks dog"]).unwrap();
    let (y, _) = folder.encode(&["a photo of sks dog"]).unwrap();
    assert_eq!(max_diff(&x.context, &y.context), 0.0);
}

#[test]
fn without_configs_the_family_is_read_from_the_keys_and_misfits_are_named() {
    let Some((file, dir)) = paths() else { return };
    // The tiny file is SD 1.x by its keys; SD 1.5's public configs do not fit its widths.
    let e = StableDiffusion::load(file.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.diffusion_model.")
            && e.contains("tiny-sd15-shape.safetensors")
            && e.contains("--model-config"),
        "{e}"
    );
    // --model-config belongs to single files
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        ..LoadOptions::default()
    };
    let e = StableDiffusion::load(dir.to_str().unwrap(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--model-config"), "{e}");
    // a diffusers UNet file is not a single-file checkpoint
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    let e = StableDiffusion::load(unet.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a single-file"), "{e}");
}

#[test]
fn the_prediction_type_flag_overrides_the_scheduler_config() {
    let Some((file, dir)) = paths() else { return };
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        prediction_type: Some("v_prediction".into()),
        ..LoadOptions::default()
    };
    let sd = StableDiffusion::load(file.to_str().unwrap(), &opts).unwrap();
    assert!(sd.scheduler_config.1.contains("\"v_prediction\""));
    let bad = LoadOptions {
        prediction_type: Some("sample".into()),
        ..opts
    };
    let e = StableDiffusion::load(file.to_str().unwrap(), &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("epsilon or v_prediction"), "{e}");
}
