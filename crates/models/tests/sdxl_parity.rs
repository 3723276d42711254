//! SDXL's models against diffusers and transformers on `tiny-sdxl-shape` (`../shared/fixtures`,
//! see its README): the UNet with its added text/time conditioning, both text encoders, and the
//! training loss with its gradients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use models::{
    ClipConfig, ClipTextModel, ClipTokenizer, Kernels, Layers, TextTime, Unet, UnetConfig, Weights,
};

fn fixture() -> Option<PathBuf> {
    testutil::fixture(
        "tiny-sdxl-shape",
        &["unet", "text_encoder_2", "reference.safetensors"],
    )
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn load_unet(dir: &Path) -> Unet {
    let cfg = UnetConfig::read(&dir.join("unet/config.json")).unwrap();
    let w = Weights::from_files(
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let unet = Unet::new(&w, &cfg, &Layers::new("tiny-sdxl-shape")).unwrap();
    w.check_all_used().unwrap();
    unet
}

fn load_text_encoder(dir: &Path, sub: &str, projection: bool) -> ClipTextModel {
    let cfg = ClipConfig::read(&dir.join(sub).join("config.json")).unwrap();
    let w = Weights::from_files(
        &[dir.join(sub).join("model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let layers = Layers::new(sub);
    let te = if projection {
        ClipTextModel::with_projection(&w, &cfg, &layers)
    } else {
        ClipTextModel::new(&w, &cfg, &layers)
    }
    .unwrap();
    w.check_all_used().unwrap();
    te
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max(&(&a - b).unwrap()) / max(b).max(1e-12)
}

#[test]
fn config_reads_the_added_conditioning_and_per_block_depths() {
    let Some(dir) = fixture() else { return };
    let cfg = UnetConfig::read(&dir.join("unet/config.json")).unwrap();
    assert_eq!(cfg.transformer_layers_per_block, vec![1, 1, 2]);
    let add = cfg.addition.expect("text_time");
    assert_eq!(
        (add.time_embed_dim, add.input_dim, add.pooled_dim()),
        (8, 80, 32)
    );
}

#[test]
fn time_and_added_embeddings_match_diffusers() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let unet = load_unet(&dir);
    let proj = unet.time_proj(&r["unet.timestep"]).unwrap();
    assert!(rel_err(&proj, &r["unet.time_proj"]) < 1e-5);
    let emb = unet.time_embedding(&proj).unwrap();
    assert!(rel_err(&emb, &r["unet.time_emb"]) < 1e-5);
    let ids = unet.add_time_proj(&r["unet.time_ids"]).unwrap();
    let e = rel_err(&ids, &r["unet.add_time_proj"]);
    assert!(e < 1e-5, "add_time_proj: {e}");
    let cond = TextTime {
        text_embeds: r["unet.text_embeds"].clone(),
        time_ids: r["unet.time_ids"].clone(),
    };
    let aug = unet.added_embedding(&cond, DType::F32).unwrap();
    let e = rel_err(&aug, &r["unet.aug_emb"]);
    assert!(e < 1e-5, "aug_emb: {e}");
    // The time ids the pipeline builds for a 128x128 image.
    let built = TextTime::time_ids((128, 128), (0, 0), (128, 128), &Device::Cpu).unwrap();
    assert_eq!(rel_err(&built, &r["unet.time_ids"]), 0.0);
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn unet_output_matches_diffusers() {
    for kernels in Kernels::ALL {
        kernels.scope(|| {
            let Some(dir) = fixture() else { return };
            let r = reference(&dir);
            let unet = load_unet(&dir);
            let cond = TextTime {
                text_embeds: r["unet.text_embeds"].clone(),
                time_ids: r["unet.time_ids"].clone(),
            };
            let out = unet
                .forward_with(
                    &r["unet.sample"],
                    &r["unet.timestep"],
                    &r["unet.encoder_hidden_states"],
                    Some(&cond),
                )
                .unwrap();
            let e = rel_err(&out, &r["unet.out"]);
            eprintln!("tiny-sdxl-shape ({kernels}): unet relative error {e:.2e}");
            assert!(e < 1e-4, "{kernels}: relative error {e}");
        });
    }
}

#[test]
fn the_added_conditioning_is_required_exactly_when_the_config_has_it() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let unet = load_unet(&dir);
    let e = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timestep"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("time ids"), "{e}");
    let wrong = TextTime {
        text_embeds: Tensor::zeros((1, 31), DType::F32, &Device::Cpu).unwrap(),
        time_ids: r["unet.time_ids"].clone(),
    };
    let e = unet
        .added_embedding(&wrong, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("31") && e.contains("32"), "{e}");
}

/// Both tokenizers give transformers' ids: `tokenizer_2` pads with "!" (id 0), and a "!" in the
/// prompt is id 0 too.
#[test]
fn both_tokenizers_match_transformers() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let ids = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect()
    };
    let t1 = ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
    let t2 = ClipTokenizer::from_dir(&dir.join("tokenizer_2")).unwrap();
    assert_eq!(t2.pad_id(), 0);
    for (name, text) in [
        ("sks", "a photo of sks dog"),
        ("empty", ""),
        ("blurry", "blurry"),
        ("caps", "A PHOTO, of SKS dog!!"),
        ("class", "a photo of dog"),
    ] {
        let k = |s: &str| format!("text.{name}.{s}");
        assert_eq!(
            t1.encode(text, true).unwrap().ids,
            ids(&r[&k("input_ids")]),
            "{name}"
        );
        assert_eq!(
            t2.encode(text, true).unwrap().ids,
            ids(&r[&k("input_ids_2")]),
            "{name}"
        );
    }
}

#[test]
fn both_text_encoders_match_transformers() {
    for kernels in Kernels::ALL {
        kernels.scope(|| {
            let Some(dir) = fixture() else { return };
            let r = reference(&dir);
            let te1 = load_text_encoder(&dir, "text_encoder", false);
            let te2 = load_text_encoder(&dir, "text_encoder_2", true);
            for name in ["sks", "empty", "blurry", "caps", "class"] {
                let k = |s: &str| format!("text.{name}.{s}");
                let o1 = te1.forward(&r[&k("input_ids")]).unwrap();
                let o2 = te2.forward(&r[&k("input_ids_2")]).unwrap();
                let checks = [
                    (&o1.last_hidden_state, "te1_last_hidden_state"),
                    (&o1.penultimate, "te1_penultimate"),
                    (&o2.penultimate, "te2_penultimate"),
                    (o2.text_embeds.as_ref().unwrap(), "te2_text_embeds"),
                ];
                for (got, key) in checks {
                    let e = rel_err(got, &r[&k(key)]);
                    assert!(e < 1e-4, "{kernels} {name} {key}: {e}");
                }
                assert!(o1.text_embeds.is_none());
            }
        });
    }
}

/// The fixture's training step: epsilon-MSE at t=321 with the added conditioning, and the
/// gradients of 7 weights (through `full` adapters on those layers), with each kernel choice.
#[test]
fn training_loss_and_gradients_match_diffusers() {
    for kernels in Kernels::ALL {
        kernels.scope(training_loss_and_gradients_match);
    }
}

fn training_loss_and_gradients_match() {
    use atoms::{AdapterConfig, LayerAdapter, Method};
    let kernels = Kernels::current().unwrap();
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let unet = load_unet(&dir);
    let layers = unet.layers();
    let grads_ref: Vec<(String, &Tensor)> = r
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("train.grad.")
                .map(|p| (p.strip_suffix(".weight").unwrap().to_string(), v))
        })
        .collect();
    assert_eq!(grads_ref.len(), 7);
    let mut vars = Vec::new();
    for (layer, _) in &grads_ref {
        let base = layers
            .get(layer)
            .unwrap_or_else(|| panic!("{layer} not registered"))
            .weight;
        let a = LayerAdapter::new(&AdapterConfig::new(Method::Full), layer, &base).unwrap();
        vars.push(atoms::Adapter::vars(&a)[0].clone());
        layers.attach(layer, a, 1.0).unwrap();
    }
    let cond = TextTime {
        text_embeds: r["text.sks.pooled_prompt_embeds"].clone(),
        time_ids: r["train.time_ids"].clone(),
    };
    let pred = unet
        .forward_with(
            &r["train.noisy"],
            &r["train.t"],
            &r["text.sks.prompt_embeds"],
            Some(&cond),
        )
        .unwrap();
    let loss = (pred - &r["train.noise"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let l = loss.to_scalar::<f32>().unwrap();
    let want = r["train.loss"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (l - want).abs() / want < 1e-5,
        "{kernels}: loss {l} vs {want}"
    );
    let grads = loss.backward().unwrap();
    for ((layer, g_ref), v) in grads_ref.iter().zip(&vars) {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("no gradient reached {layer}"));
        let e = rel_err(g, g_ref);
        assert!(e < 1e-3, "{kernels} {layer}: gradient relative error {e}");
    }
    layers.detach_all();
}
