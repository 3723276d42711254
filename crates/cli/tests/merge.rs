//! `atomtune merge`: the merged model samples what base + delta samples, as a diffusers folder
//! and as a single file (read back by our own single-file loader to the same weights).

use std::path::{Path, PathBuf};

use models::{LoadOptions, StableDiffusion};
use sample::png_io::read_png;

mod common;
use common::{atomtune, ok, tiny_fixture, train};

fn sample(extra: &[&str], out: &Path) -> Vec<u8> {
    let mut args = vec![
        "sample",
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "3",
        "--seed",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&atomtune(&args));
    let png: PathBuf = std::fs::read_dir(out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    read_png(&png).unwrap().pixels
}

fn unet_weights(sd: &StableDiffusion) -> Vec<(String, Vec<f32>)> {
    let l = sd.unet.layers();
    l.names()
        .into_iter()
        .map(|n| {
            let w = l
                .get(&n)
                .unwrap()
                .weight
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, w)
        })
        .collect()
}

#[test]
fn merged_models_sample_what_base_plus_delta_samples() {
    let (Some((tmp, fx)), Some(single)) = (
        tiny_fixture(),
        testutil::shared_path("fixtures/single-file/tiny-sd15-shape.safetensors"),
    ) else {
        return;
    };
    let (f, s) = (fx.to_str().unwrap(), single.to_str().unwrap());
    let d = train(&tmp, f, &["--max-steps", "2", "--lr", "0.02"]);
    let d = d.to_str().unwrap();
    let folder = tmp.path().join("merged");
    let file = tmp.path().join("merged.safetensors");
    let file2 = tmp.path().join("merged-from-single.safetensors");
    let folder2 = tmp.path().join("merged-folder-from-single");
    for (model, out) in [(f, &folder), (f, &file), (s, &file2), (s, &folder2)] {
        let mut args = vec![
            "merge",
            "--model",
            model,
            "--delta",
            d,
            "--dtype",
            "f32",
            "--out",
            out.to_str().unwrap(),
        ];
        if model == s {
            args.extend(["--model-config", f]);
        }
        ok(&atomtune(&args));
    }
    // bf16 products for the process change nothing: a merge writes the weights as stored
    let file3 = tmp.path().join("merged-bf16-env.safetensors");
    let o = common::command([
        "merge",
        "--model",
        f,
        "--delta",
        d,
        "--dtype",
        "f32",
        "--out",
        file3.to_str().unwrap(),
    ])
    .env("ATOMTUNE_CPU_BF16", "1")
    .output()
    .unwrap();
    ok(&o);
    assert!(std::fs::read(&file3).unwrap() == std::fs::read(&file).unwrap());
    let with_delta = sample(&["--model", f, "--delta", d], &tmp.path().join("a"));
    let base = sample(&["--model", f], &tmp.path().join("b"));
    assert_ne!(with_delta, base, "the delta changes the image");
    let merged = sample(
        &["--model", folder.to_str().unwrap()],
        &tmp.path().join("c"),
    );
    assert_eq!(merged, with_delta);
    // the folder written from the single file: the same images, and a folder diffusers' layout
    let merged_from_single = sample(
        &["--model", folder2.to_str().unwrap()],
        &tmp.path().join("c2"),
    );
    assert_eq!(merged_from_single, with_delta);
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(folder2.join(f).is_file(), "{f}");
    }
    let merged_single = sample(
        &["--model", file.to_str().unwrap(), "--model-config", f],
        &tmp.path().join("d"),
    );
    assert_eq!(merged_single, with_delta);
    // the single files read back to the merged folder's weights
    let opts = LoadOptions {
        model_config: Some(f.to_string()),
        ..LoadOptions::default()
    };
    let want = unet_weights(
        &StableDiffusion::load(folder.to_str().unwrap(), &LoadOptions::default()).unwrap(),
    );
    for p in [&file, &file2] {
        let got = unet_weights(&StableDiffusion::load(p.to_str().unwrap(), &opts).unwrap());
        assert!(got == want, "{}", p.display());
    }
    let from_single = StableDiffusion::load(folder2.to_str().unwrap(), &LoadOptions::default());
    assert!(unet_weights(&from_single.unwrap()) == want);
    // the model's own folder as --out is refused before anything is written (the config copy
    // truncated the source's files)
    let own = tmp.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    let index = std::fs::read(fx.join("model_index.json")).unwrap();
    std::fs::write(own.join("model_index.json"), &index).unwrap();
    let o = own.to_str().unwrap();
    let out = atomtune(&["merge", "--model", o, "--delta", d, "--out", o]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("is the model itself"), "{e}");
    assert_eq!(std::fs::read(own.join("model_index.json")).unwrap(), index);
    // a preset has no files
    let o = atomtune(&[
        "merge",
        "--model",
        "sd15-random",
        "--delta",
        d,
        "--out",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no files to merge"));
}

/// Seeded values in [-0.5, 0.5) of `shape`.
fn seeded(shape: &[usize], seed: u64) -> candle_core::Tensor {
    let v = testutil::seeded_values(shape.iter().product(), seed);
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// A kohya LoRA file at `path` of rank 2 on each `(module, out, in)`.
fn write_lora(path: &Path, modules: &[(&str, usize, usize)]) {
    let mut t = std::collections::HashMap::new();
    for (i, (m, out, inp)) in modules.iter().enumerate() {
        let seed = 10 * i as u64;
        t.insert(format!("{m}.lora_down.weight"), seeded(&[2, *inp], seed));
        t.insert(format!("{m}.lora_up.weight"), seeded(&[*out, 2], seed + 1));
    }
    candle_core::safetensors::save(&t, path).unwrap();
}

/// A text-encoder layer's weight in a model.
fn text_weight(model: &str, opts: &LoadOptions, encoder: usize, layer: &str) -> Vec<f32> {
    let sd = StableDiffusion::load(model, opts).unwrap();
    let e = sd.text.iter().nth(encoder).unwrap();
    let w = e.model.layers().get(layer).unwrap().weight;
    w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A community LoRA with text-encoder modules merges into each layout (it was refused): the
/// merged models sample what base + LoRA samples, on SD 1.x (folder, single file from the folder
/// and from a single file, folder from a single file) and on SDXL, whose second encoder a single file holds in OpenCLIP's
/// layout: its k projection goes into the middle rows of the fused `in_proj`.
#[test]
fn text_encoder_loras_merge_into_every_layout() {
    let (Some((tmp, fx)), Some(single), Some(xl)) = (
        tiny_fixture(),
        testutil::shared_path("fixtures/single-file/tiny-sd15-shape.safetensors"),
        testutil::shared_path("fixtures/tiny-sdxl-shape"),
    ) else {
        return;
    };
    let (f, s, x) = (
        fx.to_str().unwrap(),
        single.to_str().unwrap(),
        xl.to_str().unwrap(),
    );
    let lora = tmp.path().join("lora.safetensors");
    write_lora(
        &lora,
        &[
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                32,
                32,
            ),
            ("lora_te_text_model_encoder_layers_1_mlp_fc1", 37, 32),
            ("lora_unet_conv_in", 32, 4 * 9),
        ],
    );
    let l = lora.to_str().unwrap();
    let merge = |model: &str, delta: &str, out: &Path, config: Option<&str>| {
        let mut args = vec!["merge", "--model", model, "--dtype", "f32"];
        args.extend(["--out", out.to_str().unwrap()]);
        if !delta.is_empty() {
            args.extend(["--delta", delta]);
        }
        if let Some(c) = config {
            args.extend(["--model-config", c]);
        }
        ok(&atomtune(&args));
    };
    let folder = tmp.path().join("sd1-folder");
    let file = tmp.path().join("sd1-file.safetensors");
    let file2 = tmp.path().join("sd1-from-single.safetensors");
    merge(f, l, &folder, None);
    merge(f, l, &file, None);
    merge(s, l, &file2, Some(f));
    let folder2 = tmp.path().join("sd1-folder-from-single");
    merge(s, l, &folder2, Some(f));
    let with_lora = sample(&["--model", f, "--delta", l], &tmp.path().join("a"));
    assert_ne!(with_lora, sample(&["--model", f], &tmp.path().join("b")));
    for (i, m) in [&folder, &file, &file2, &folder2].into_iter().enumerate() {
        let m = m.to_str().unwrap();
        let mut args = vec!["--model", m];
        if m.ends_with(".safetensors") {
            args.extend(["--model-config", f]);
        }
        let got = sample(&args, &tmp.path().join(format!("sd1-{i}")));
        assert!(got == with_lora, "{m}");
    }

    // SDXL: both encoders, the second's k projection inside OpenCLIP's fused in_proj
    let k = "text_model.encoder.layers.1.self_attn.k_proj";
    write_lora(
        &lora,
        &[
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
                32,
                32,
            ),
            (
                "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
                32,
                32,
            ),
        ],
    );
    let (a, plain, c) = (
        tmp.path().join("xl-a.safetensors"),
        tmp.path().join("xl-plain.safetensors"),
        tmp.path().join("xl-c.safetensors"),
    );
    let xl_folder = tmp.path().join("xl-folder");
    merge(x, l, &xl_folder, None);
    merge(x, l, &a, None);
    merge(x, "", &plain, None);
    merge(plain.to_str().unwrap(), l, &c, Some(x));
    let opts = LoadOptions {
        model_config: Some(x.to_string()),
        ..LoadOptions::default()
    };
    let folders = LoadOptions::default();
    let want = text_weight(xl_folder.to_str().unwrap(), &folders, 1, k);
    assert_ne!(want, text_weight(x, &folders, 1, k), "the LoRA changes k");
    for m in [&a, &c] {
        assert!(
            text_weight(m.to_str().unwrap(), &opts, 1, k) == want,
            "{}",
            m.display()
        );
    }
    let with_lora = sample(&["--model", x, "--delta", l], &tmp.path().join("xa"));
    let merged = sample(
        &["--model", c.to_str().unwrap(), "--model-config", x],
        &tmp.path().join("xc"),
    );
    assert!(merged == with_lora);
}
