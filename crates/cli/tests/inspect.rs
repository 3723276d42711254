//! `atomtune inspect` end to end: a tiny UNet-shaped base on disk, a delta made by the library,
//! and the binary run on them.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use atoms::{AdapterConfig, Delta, DeltaMeta, LayerAdapter, Method, TensorBase};
use candle_core::{Device, Tensor};
use testutil::{unet_convs, UnetShape};

use common::atomtune;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A narrow SD 1.5-structured UNet's conv weights, seeded.
fn tiny_unet(seed: u64) -> TensorBase {
    let shape = UnetShape {
        block_out_channels: vec![8, 16, 16, 16],
        ..UnetShape::sd15()
    };
    let weights = unet_convs(&shape)
        .into_iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| {
                    (((k as u64 * 2654435761 + i as u64 * 97 + seed) % 1000) as f32 / 500.0) - 1.0
                })
                .collect();
            (name, Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
        });
    TensorBase::new("tiny", weights)
}

/// Saves `base` as a diffusers folder `dir/unet/diffusion_pytorch_model.safetensors`.
fn save_diffusers(base: &TensorBase, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    let tensors: HashMap<String, Tensor> = base
        .weights()
        .iter()
        .map(|(k, v)| (format!("{k}.weight"), v.clone()))
        .collect();
    candle_core::safetensors::save(
        &tensors,
        dir.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir.to_path_buf()
}

/// An `atoms` delta on every 3x3 conv of `base`.
fn save_delta(base: &TensorBase, path: &Path) {
    let adapters: Vec<(String, LayerAdapter)> = base
        .weights()
        .iter()
        .filter(|(_, w)| w.dims()[2..] == [3, 3])
        .map(|(k, w)| {
            (
                k.clone(),
                LayerAdapter::new(&AdapterConfig::new(Method::Atoms), k, w).unwrap(),
            )
        })
        .collect();
    let mut meta = DeltaMeta::new(AdapterConfig::new(Method::Atoms), "org/tiny-base");
    meta.trigger = Some("sks".into());
    meta.class = Some("dog".into());
    meta.steps = Some(400);
    meta.seed = Some(42);
    Delta::from_adapters(meta, adapters.iter().map(|(k, a)| (k.as_str(), a)), base)
        .unwrap()
        .write(path)
        .unwrap();
}

#[test]
fn inspect_describes_a_delta_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let delta = dir.path().join("delta.safetensors");
    save_delta(&tiny_unet(0), &delta);
    let o = atomtune(&["inspect", delta.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "atoms (svd atoms, m = d)",
        "52 (52 with d =   9)",
        "4,212 trainable",
        "org/tiny-base",
        "sks (class dog)",
        "400 steps, seed 42",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let o = atomtune(&["inspect", "--json", delta.to_str().unwrap()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["parameters"], 4212);
    assert_eq!(v["num_layers"], 52);
    assert_eq!(v["method"], "atoms");
    assert_eq!(v["layers"]["conv_in"]["delta"], serde_json::json!([9, 9]));
    assert_eq!(v["file_size"], std::fs::metadata(&delta).unwrap().len());
    assert!(v["base_fit"].is_null());
}

#[test]
fn inspect_with_base_says_whether_the_delta_fits() {
    let dir = tempfile::tempdir().unwrap();
    let delta = dir.path().join("delta.safetensors");
    let base = tiny_unet(0);
    save_delta(&base, &delta);
    let same = save_diffusers(&base, &dir.path().join("same"));
    let derived = save_diffusers(&tiny_unet(1), &dir.path().join("derived"));
    let d = delta.to_str().unwrap();

    let o = atomtune(&["inspect", d, "--base", same.to_str().unwrap(), "--strict"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("fits base    yes (same base weights)"),
        "{}",
        stdout(&o)
    );

    let o = atomtune(&["inspect", d, "--json", "--base", derived.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["base_fit"]["fits"], true);
    assert_eq!(v["base_fit"]["same_base"], false);
    assert!(v["base_fit"]["warning"]
        .as_str()
        .unwrap()
        .contains("org/tiny-base"));

    let o = atomtune(&[
        "inspect",
        d,
        "--base",
        derived.to_str().unwrap(),
        "--strict",
    ]);
    assert!(!o.status.success());
    assert!(
        stdout(&o).contains("fits base    no: delta was trained on base `org/tiny-base`"),
        "{}",
        stdout(&o)
    );

    // Another architecture: a base without the delta's layers.
    let other = TensorBase::new(
        "x",
        [(
            "conv_in".to_string(),
            Tensor::zeros((8, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    let other = save_diffusers(&other, &dir.path().join("other"));
    let o = atomtune(&["inspect", d, "--base", other.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stdout(&o).contains("does not exist in the base model"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn bad_inputs_get_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let o = atomtune(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("broken.safetensors") && stderr(&o).contains("not a valid safetensors"),
        "{}",
        stderr(&o)
    );

    let delta = dir.path().join("delta.safetensors");
    save_delta(&tiny_unet(0), &delta);
    let pickle = dir.path().join("pickle");
    std::fs::create_dir_all(pickle.join("unet")).unwrap();
    std::fs::write(pickle.join("unet/diffusion_pytorch_model.bin"), b"x").unwrap();
    let o = atomtune(&[
        "inspect",
        delta.to_str().unwrap(),
        "--base",
        pickle.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("convert it to safetensors"),
        "{}",
        stderr(&o)
    );

    let o = atomtune(&["inspect", "nope.safetensors"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.safetensors"), "{}", stderr(&o));
}
