//! The evaluation models against transformers on `../shared/fixtures/eval-tiny` (random-weight
//! models in the layouts of `facebook/dino-vits16` and `openai/clip-vit-base-patch32`, and their
//! outputs for the photos of `datasets/dreambooth/dog2`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use eval::preprocess::{load_rgb, Preprocessor};
use eval::Evaluator;

fn fixture() -> Option<PathBuf> {
    testutil::fixture(
        "eval-tiny",
        &["dino-vits-tiny", "clip-vit-tiny", "reference.safetensors"],
    )
}

fn photos() -> Option<Vec<PathBuf>> {
    let dir = testutil::shared_path("datasets/dreambooth/dog2")?;
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    v.sort();
    Some(v)
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(b)
}

fn evaluator(fx: &Path) -> Evaluator {
    Evaluator::load_dirs(
        &fx.join("dino-vits-tiny"),
        &fx.join("clip-vit-tiny"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Our resize is the `image` crate's, transformers' is PIL's: the same filters, 8-bit
/// intermediates rounded apart. On these photos (512 -> 32 px) every pixel value is within one
/// 8-bit step of transformers' (1/255/std after normalization: 0.0175 for DINO's bilinear,
/// 0.0150 for CLIP's bicubic), 0.003 on average.
#[test]
fn pixel_values_match_transformers_within_resampling() {
    let (Some(fx), Some(photos)) = (fixture(), photos()) else {
        return;
    };
    let r = reference(&fx);
    assert_eq!(photos.len(), r["dino.pixel_values"].dim(0).unwrap());
    // one 8-bit step at the channel with the smallest std
    for (model, key, step) in [
        ("dino-vits-tiny", "dino.pixel_values", 1.0 / 255.0 / 0.224),
        ("clip-vit-tiny", "clip.pixel_values", 1.0 / 255.0 / 0.2613),
    ] {
        let pre = Preprocessor::read(&fx.join(model).join("preprocessor_config.json")).unwrap();
        let ours: Vec<Tensor> = photos
            .iter()
            .map(|p| pre.apply(&load_rgb(p).unwrap(), &Device::Cpu).unwrap())
            .collect();
        let ours = Tensor::stack(&ours, 0).unwrap();
        let d = (&ours - &r[key]).unwrap().abs().unwrap();
        let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let max = max_abs(&d);
        eprintln!("{model}: pixel values differ by {mean:.4} on average, {max:.4} at most");
        assert!(
            mean < 0.005 && max < step * 1.01,
            "{model}: mean {mean}, max {max}"
        );
    }
}

#[test]
fn dino_features_and_clip_embeddings_match_transformers() {
    let Some(fx) = fixture() else { return };
    let r = reference(&fx);
    let ev = evaluator(&fx);
    // on identical inputs: transformers' pixel values
    let dino = eval::vit::VitModel::new(
        &models::Weights::from_files(
            &[fx.join("dino-vits-tiny/model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
        &eval::vit::VitConfig::read(&fx.join("dino-vits-tiny/config.json")).unwrap(),
    )
    .unwrap();
    let e = rel_err(&dino.cls(&r["dino.pixel_values"]).unwrap(), &r["dino.cls"]);
    assert!(e < 1e-3, "DINO [CLS]: {e}");
    let dir = fx.join("clip-vit-tiny");
    let clip = eval::clip::ClipModel::new(
        &models::Weights::from_files(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
            .unwrap(),
        &eval::clip::ClipModelConfig::read(&dir.join("config.json")).unwrap(),
        &dir,
    )
    .unwrap();
    let e = rel_err(
        &clip.image_embeds(&r["clip.pixel_values"]).unwrap(),
        &r["clip.image_embeds"],
    );
    assert!(e < 1e-3, "CLIP image embeddings: {e}");
    let ids: Vec<u32> = r["clip.input_ids"]
        .get(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(
        clip.tokenizer()
            .encode("a photo of a dog", true)
            .unwrap()
            .ids,
        ids
    );
    let n = r["clip.text_embeds"].dim(0).unwrap();
    let text = ev.clip_text(&vec!["a photo of a dog"; n]).unwrap();
    let e = rel_err(&text, &r["clip.text_embeds"]);
    assert!(e < 1e-3, "CLIP text embeddings: {e}");
}

/// The three metrics, worked out here from transformers' embeddings with plain loops, equal
/// `metrics::score` on them: the first three photos as "generated", the last three as "real".
#[test]
fn metrics_equal_a_hand_computation_from_the_reference_embeddings() {
    let Some(fx) = fixture() else { return };
    let r = reference(&fx);
    let rows = |k: &str| r[k].to_vec2::<f32>().unwrap();
    let (dino, img, txt) = (
        rows("dino.cls"),
        rows("clip.image_embeds"),
        rows("clip.text_embeds"),
    );
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    let pairs = |f: &[Vec<f32>]| {
        let mut s = 0.0;
        for g in 0..3 {
            for q in 3..6 {
                s += cos(&f[g], &f[q]);
            }
        }
        s / 9.0
    };
    let want_dino = pairs(&dino);
    let want_clip_i = pairs(&img);
    let want_clip_t = (0..3).map(|g| cos(&img[g], &txt[g])).sum::<f64>() / 3.0;
    let part = |k: &str, from: usize| r[k].narrow(0, from, 3).unwrap();
    let s = eval::metrics::score(
        &part("dino.cls", 0),
        &part("dino.cls", 3),
        &part("clip.image_embeds", 0),
        &part("clip.image_embeds", 3),
        &part("clip.text_embeds", 0),
    )
    .unwrap();
    for (got, want, name) in [
        (s.dino, want_dino, "DINO"),
        (s.clip_i, want_clip_i, "CLIP-I"),
        (s.clip_t, want_clip_t, "CLIP-T"),
    ] {
        assert!((got - want).abs() < 1e-6, "{name}: {got} vs {want}");
    }
    assert_eq!(s.per_image.len(), 3);
    assert!((s.per_image[1].clip_t - cos(&img[1], &txt[1])).abs() < 1e-6);
}
