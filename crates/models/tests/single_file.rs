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

/// SDXL in the single-file layout (written by our merge: the UNet and VAE in LDM names, the
/// first text encoder under `conditioner.embedders.0.transformer.`, the second in OpenCLIP's
/// layout with q, k, v fused and the projection transposed) reads back to the folder's model:
/// family from the keys, the same weights and text embeddings.
#[test]
fn an_sdxl_single_file_round_trips_through_merge_and_the_loader() {
    use models::merge::{merge, MergeOutput, MergeSource};
    let Some(dir) = testutil::shared_path("fixtures/tiny-sdxl-shape") else {
        return;
    };
    let folder = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("xl.safetensors");
    merge(
        MergeSource::Folder(dir.clone()),
        None,
        &MergeOutput {
            family: folder.architecture,
            unet: folder.unet.config(),
            baked: &Default::default(),
            out: &out,
            dtype: candle_core::DType::F32,
        },
    )
    .unwrap();
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        ..LoadOptions::default()
    };
    let single = StableDiffusion::load(out.to_str().unwrap(), &opts).unwrap();
    assert_eq!(single.architecture, Architecture::Sdxl);
    let (a, b) = (single.unet.layers(), folder.unet.layers());
    for name in b.names() {
        let d = max_diff(&a.get(&name).unwrap().weight, &b.get(&name).unwrap().weight);
        assert_eq!(d, 0.0, "{name}");
    }
    let (x, _) = single.encode(&["a photo of sks dog"]).unwrap();
    let (y, _) = folder.encode(&["a photo of sks dog"]).unwrap();
    assert_eq!(max_diff(&x.context, &y.context), 0.0);
    assert_eq!(
        max_diff(x.pooled.as_ref().unwrap(), y.pooled.as_ref().unwrap()),
        0.0
    );
    let keys: Vec<String> = candle_core::safetensors::load(&out, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(keys
        .iter()
        .any(|k| k.ends_with("resblocks.0.attn.in_proj_weight")));
    assert!(keys
        .iter()
        .any(|k| k == "model.diffusion_model.label_emb.0.0.weight"));
}

/// The SD 2.x layout: a copy of tiny-sd15-shape whose text encoder is OpenCLIP's kind (exact
/// GELU) is an SD 2.x model; written as a single file its encoder goes under
/// `cond_stage_model.model.` with q, k, v fused, and reads back to the same embeddings.
#[test]
fn an_sd2_single_file_round_trips_through_merge_and_the_loader() {
    use models::merge::{merge, MergeOutput, MergeSource};
    let Some(src) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sd2");
    copy_dir(&src, &dir);
    let cfg = dir.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\"quick_gelu\""));
    // (the copy keeps the fixture's read-only mode: replace the file rather than write into it)
    std::fs::remove_file(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"quick_gelu\"", "\"gelu\"")).unwrap();
    let folder = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(folder.architecture, Architecture::Sd2);
    let out = tmp.path().join("sd2.safetensors");
    merge(
        MergeSource::Folder(dir.clone()),
        None,
        &MergeOutput {
            family: folder.architecture,
            unet: folder.unet.config(),
            baked: &Default::default(),
            out: &out,
            dtype: candle_core::DType::F32,
        },
    )
    .unwrap();
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        ..LoadOptions::default()
    };
    let single = StableDiffusion::load(out.to_str().unwrap(), &opts).unwrap();
    assert_eq!(single.architecture, Architecture::Sd2);
    let (x, _) = single.encode(&["a photo of sks dog"]).unwrap();
    let (y, _) = folder.encode(&["a photo of sks dog"]).unwrap();
    assert_eq!(max_diff(&x.context, &y.context), 0.0);
    let keys: Vec<String> = candle_core::safetensors::load(&out, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(keys
        .iter()
        .any(|k| k == "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"));
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}
