//! Loading pipelines: local diffusers folders, hub ids through a (pre-filled, offline) cache,
//! dtypes, and the errors a user meets.

use std::path::{Path, PathBuf};

use candle_core::DType;
use models::{LoadOptions, ModelSpec, Preset, StableDiffusion, Targets};

fn fixture(name: &str) -> Option<PathBuf> {
    testutil::shared_path(&format!("fixtures/{name}"))
}

/// Copies a fixture folder (only what a pipeline needs) to `dst`.
fn copy_pipeline(src: &Path, dst: &Path) {
    for dir in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dst.join(dir)).unwrap();
        for e in std::fs::read_dir(src.join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(dir).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join("model_index.json"), dst.join("model_index.json")).unwrap();
}

#[test]
fn a_local_folder_loads_every_part_in_any_dtype() {
    let Some(fx) = fixture("tiny-sd15-shape") else {
        return;
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        let sd = StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
        assert!(sd.text.first.tokenizer.is_some());
        assert!(sd.scheduler_config.1.contains("DDIMScheduler"));
        let conv = sd.unet.layers().get("conv_in").unwrap();
        assert_eq!(conv.weight.dtype(), dtype);
        // The layer table names every conv as diffusers does.
        let mut convs = sd.unet.layers().select(Targets::Conv);
        let mut want: Vec<String> = testutil::unet_convs(&testutil::UnetShape::tiny_sd15_shape())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        convs.sort();
        want.sort();
        assert_eq!(convs, want);
        assert_eq!(sd.unet.layers().select(Targets::Conv3x3).len(), 52);
        // 16 transformers x 2 attentions x 4 projections
        assert_eq!(sd.unet.layers().select(Targets::Attn).len(), 128);
    }
}

#[test]
fn model_specs_are_folders_presets_or_hub_ids() {
    assert_eq!(
        ModelSpec::parse("sd15-random").unwrap(),
        ModelSpec::Random(Preset::Sd15)
    );
    assert_eq!(
        ModelSpec::parse("stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap(),
        ModelSpec::Hub("stable-diffusion-v1-5/stable-diffusion-v1-5".into())
    );
    assert_eq!(ModelSpec::parse(".").unwrap(), ModelSpec::Local(".".into()));
    let e = ModelSpec::parse("no/such/folder").unwrap_err().to_string();
    assert!(
        e.contains("not a folder") && e.contains("a hub repo id"),
        "{e}"
    );
}

#[test]
fn broken_folders_get_errors_that_say_what_to_do() {
    let Some(fx) = fixture("tiny-sd-2block") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_pipeline(&fx, &dir);
    let load = |opts: &LoadOptions| {
        StableDiffusion::load_dir(&dir, "m", opts)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(load(&LoadOptions::default()), None);

    let e = load(&LoadOptions {
        variant: Some("fp16".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(
        e.contains("no `fp16` variant") && e.contains("diffusion_pytorch_model.fp16.safetensors"),
        "{e}"
    );

    // Only fp16 weights there: used without asking.
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::rename(
        &unet,
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    assert_eq!(load(&LoadOptions::default()), None);
    // ...but asking for the variant where a component lacks it is an error naming it.
    let e = load(&LoadOptions {
        variant: Some("fp16".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(
        e.contains("vae/diffusion_pytorch_model.fp16.safetensors"),
        "{e}"
    );

    // A pickle only.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    std::fs::write(dir.join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    let e = load(&LoadOptions::default()).unwrap();
    assert!(
        e.contains("diffusion_pytorch_model.bin") && e.contains("save_pretrained"),
        "{e}"
    );

    // Weights of another config: the key and both shapes are named.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.bin")).unwrap();
    std::fs::copy(fx.join("unet/diffusion_pytorch_model.safetensors"), &unet).unwrap();
    let cfg = std::fs::read_to_string(dir.join("unet/config.json")).unwrap();
    std::fs::write(
        dir.join("unet/config.json"),
        cfg.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 64"),
    )
    .unwrap();
    let e = load(&LoadOptions::default()).unwrap();
    assert!(
        e.contains("attn2.to_k.weight` has shape [32, 32], the config expects [32, 64]"),
        "{e}"
    );

    std::fs::write(dir.join("unet/config.json"), cfg).unwrap();
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let e = load(&LoadOptions::default()).unwrap();
    assert!(e.contains("missing vae/ folder"), "{e}");
}

#[test]
fn pipelines_of_other_families_are_refused_by_name() {
    let Some(fx) = fixture("tiny-sd-2block") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_pipeline(&fx, &dir);
    let index = std::fs::read_to_string(dir.join("model_index.json")).unwrap();
    let cases = [
        ("\"StableDiffusionPipeline\"", "\"StableDiffusion3Pipeline\"", "StableDiffusion3Pipeline"),
        ("\"StableDiffusionPipeline\"", "\"FluxPipeline\"", "FluxPipeline"),
        // an SDXL refiner: no first text encoder
        (
            "\"StableDiffusionPipeline\"",
            "\"StableDiffusionXLPipeline\", \"text_encoder_2\": [\"transformers\", \"CLIPTextModelWithProjection\"], \"x\": 0",
            "refiners",
        ),
    ];
    for (from, to, want) in cases {
        let mut text = index.replace(from, to);
        if want == "refiners" {
            text = text.replace(
                "\"text_encoder\": [\n    \"transformers\",\n    \"CLIPTextModel\"\n  ]",
                "\"text_encoder\": [null, null]",
            );
            assert!(text.contains("[null, null]"), "{text}");
        }
        std::fs::write(dir.join("model_index.json"), text).unwrap();
        let e = StableDiffusion::load_dir(&dir, "m", &LoadOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(want) && e.contains("model_index.json"), "{e}");
    }
}
