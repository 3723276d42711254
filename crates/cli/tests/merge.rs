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
    for (model, out) in [(f, &folder), (f, &file), (s, &file2)] {
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
