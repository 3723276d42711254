//! Tokenizer and text encoder against transformers on the reference fixtures.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use models::{ClipConfig, ClipTextModel, ClipTokenizer, Layers, Weights};

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const PROMPT: &str = "a photo of sks dog";

/// A copy of the fixture's tokenizer folder without tokenizer.json: SD repos ship only
/// vocab.json and merges.txt.
fn vocab_merges_only(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn tokenizer_ids_match_exactly_from_either_file_set() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd-2block") else {
        return;
    };
    let r = candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
    let bare = vocab_merges_only(&fx.join("tokenizer"));
    for dir in [fx.join("tokenizer"), bare.path().to_path_buf()] {
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            tok.encode(PROMPT, true).unwrap().ids,
            ids(&r["text.input_ids"]),
            "{}",
            dir.display()
        );
        assert_eq!(
            tok.encode(PROMPT, false).unwrap().ids,
            ids(&r["text.input_ids_unpadded"])
        );
        assert_eq!(
            tok.encode("", true).unwrap().ids,
            ids(&r["text.uncond_input_ids"])
        );
        assert_eq!(
            tok.encode("A  Photo of SKS dog", false).unwrap().ids,
            vec![49406, 320, 1125, 539, 48136, 1929, 49407]
        );
        // Over-long prompts are cut to 77 ids, ending with the end token, and say so.
        let long = tok.encode(&"dog ".repeat(100), true).unwrap();
        assert_eq!(long.ids.len(), 77);
        assert_eq!(long.ids[76], 49407);
        assert_eq!(long.truncated_from, Some(100));
    }
}

#[test]
fn sd2_style_padding_token_comes_from_the_special_tokens_map() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd-2block/tokenizer") else {
        return;
    };
    let dir = vocab_merges_only(&fx);
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let t = tok.encode(PROMPT, true).unwrap();
    assert_eq!(&t.ids[7..10], &[0, 0, 0]);
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn text_encoder_matches_transformers() {
    for kernels in models::Kernels::ALL {
        kernels.scope(text_encoder_matches);
    }
}

fn text_encoder_matches() {
    for name in ["tiny-sd-2block", "tiny-sd15-shape"] {
        let Some(fx) = testutil::shared_path(&format!("fixtures/{name}")) else {
            return;
        };
        let r =
            candle_core::safetensors::load(fx.join("reference.safetensors"), &Device::Cpu).unwrap();
        let cfg = ClipConfig::read(&fx.join("text_encoder/config.json")).unwrap();
        let w = Weights::from_files(
            &[fx.join("text_encoder/model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let te = ClipTextModel::new(&w, &cfg, &Layers::new("te")).unwrap();
        w.check_all_used().unwrap();
        let out = te.forward(&r["text.input_ids"]).unwrap();
        let e = rel_err(&out.last_hidden_state, &r["text.last_hidden_state"]);
        assert!(e < 1e-4, "{name}: last hidden state error {e}");
        let e = rel_err(&out.pooled, &r["text.pooler_output"]);
        assert!(e < 1e-4, "{name}: pooled error {e}");
        let out = te.forward(&r["text.uncond_input_ids"]).unwrap();
        let e = rel_err(&out.last_hidden_state, &r["text.uncond_last_hidden_state"]);
        assert!(e < 1e-4, "{name}: uncond error {e}");
    }
}

/// Pivotal tuning's added tokens: one id each, whole words only, case-folded like the rest.
#[test]
fn added_tokens_are_whole_words_with_their_own_ids() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd-2block/tokenizer") else {
        return;
    };
    let tok = ClipTokenizer::from_dir(&fx).unwrap();
    tok.add_token("<sks>", &[49408]).unwrap();
    tok.add_token("zwx", &[49409, 49410]).unwrap();
    let enc = |p: &str| tok.encode(p, false).unwrap().ids;
    assert_eq!(
        enc("A photo of <SKS> dog"),
        vec![49406, 320, 1125, 539, 49408, 1929, 49407]
    );
    assert_eq!(
        enc("zwx, zwx"),
        vec![49406, 49409, 49410, 267, 49409, 49410, 49407]
    );
    // inside a word it is no trigger
    assert!(!enc("zwxdog").contains(&49409));
    assert!(!enc("a zwxy").contains(&49409));
    assert!(tok.add_token("<SKS>", &[49411]).is_err(), "added twice");
    assert!(tok.add_token("two words", &[49411]).is_err());
}

/// The gradient of a learned token row through the text encoder equals central finite
/// differences.
#[test]
fn a_learned_token_row_gets_the_gradient_of_finite_differences() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let cfg = ClipConfig::read(&fx.join("text_encoder/config.json")).unwrap();
    let w = Weights::from_files(
        &[fx.join("text_encoder/model.safetensors")],
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let te = ClipTextModel::new(&w, &cfg, &Layers::new("te")).unwrap();
    let h = cfg.hidden_size;
    let wave = |k: usize, s: f64| -> Tensor {
        let v: Vec<f64> = (0..k)
            .map(|i| ((i * 7 + 3) as f64 * s).sin() * 0.05)
            .collect();
        Tensor::from_vec(v, k, &Device::Cpu).unwrap()
    };
    let row = candle_core::Var::from_tensor(&wave(h, 0.37)).unwrap();
    let id = te.add_embedding(row.as_tensor()).unwrap();
    assert_eq!(id as usize, cfg.vocab_size);
    let ids = Tensor::new(&[[49406u32, 320, id, 1929, 49407, 49407]], &Device::Cpu).unwrap();
    let probe = wave(6 * h, 0.11).reshape((1, 6, h)).unwrap();
    let loss = |t: &ClipTextModel| -> Tensor {
        let o = t.forward(&ids).unwrap();
        ((o.last_hidden_state * &probe).unwrap().sum_all().unwrap() + o.pooled.sum_all().unwrap())
            .unwrap()
    };
    let g = loss(&te).backward().unwrap();
    let grad = g.get(&row).expect("the row gets a gradient").clone();
    let dir = wave(h, 0.53);
    let analytic = (&grad * &dir)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let at = |s: f64| {
        let r0 = row.as_tensor().copy().unwrap();
        row.set(&(&r0 + (&dir * s).unwrap()).unwrap()).unwrap();
        let l = loss(&te).to_scalar::<f64>().unwrap();
        row.set(&r0).unwrap();
        l
    };
    // the encoder's attention computes in f32 whatever the weights' dtype: a step well above
    // f32's rounding (the loss is about 1), whose O(eps^2) truncation error is far below it
    let eps = 1e-2;
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    assert!(
        (analytic - numeric).abs() <= 1e-3 * numeric.abs().max(1e-2),
        "analytic {analytic} vs finite differences {numeric}"
    );
    assert!(analytic.abs() > 1e-6, "a zero gradient proves nothing");
}

/// transformers 5.6 and later save `CLIPTextModel` without its `text_model.` prefix: such a file
/// loads to the same encoder.
#[test]
fn a_flattened_text_encoder_file_loads_the_same() {
    let Some(fx) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let src = fx.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let flat: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
                t.clone(),
            )
        })
        .collect();
    assert!(flat.contains_key("embeddings.token_embedding.weight"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&flat, &path).unwrap();
    let cfg = ClipConfig::read(&fx.join("text_encoder/config.json")).unwrap();
    let out = |p: &Path| {
        let w = Weights::from_files(&[p.to_path_buf()], DType::F32, &Device::Cpu).unwrap();
        let te = ClipTextModel::new(&w, &cfg, &Layers::new("te")).unwrap();
        w.check_all_used().unwrap();
        let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 49407]], &Device::Cpu).unwrap();
        te.forward(&ids)
            .unwrap()
            .last_hidden_state
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(out(&path), out(&src));
}
