//! Malformed configs and checkpoints give errors, never panics: seeded random mutations of the
//! tiny fixtures' configs (keys dropped, values of other types, zeros, empty lists, small odd
//! numbers) through the parsers and, when a config parses, through building the model with
//! random weights; and corrupted single-file checkpoints through the single-file loader.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{DType, Device};
use models::{
    ClipConfig, ClipTextModel, Layers, LoadOptions, StableDiffusion, Unet, UnetConfig, Vae,
    VaeConfig, Weights,
};
use serde_json::Value;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values a mutation puts in place of a key's value: small, so a parsed model stays tiny.
fn replacement(rng: &mut Rng) -> Value {
    let choices = [
        Value::Null,
        serde_json::json!(0),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(-1),
        serde_json::json!(2.5),
        serde_json::json!("x"),
        serde_json::json!([]),
        serde_json::json!([0]),
        serde_json::json!([2, 3]),
        serde_json::json!({}),
        serde_json::json!(true),
    ];
    choices[rng.below(choices.len())].clone()
}

fn mutate(base: &Value, rng: &mut Rng) -> String {
    let mut v = base.clone();
    let obj = v.as_object_mut().expect("configs are objects");
    let keys: Vec<String> = obj.keys().cloned().collect();
    // sometimes every list at once: empty, or cut to its first entry (lists that must agree in
    // length then still agree)
    match rng.below(6) {
        0 => obj
            .values_mut()
            .filter(|x| x.is_array())
            .for_each(|x| *x = Value::Array(vec![])),
        1 => obj.values_mut().for_each(|x| {
            if let Value::Array(a) = x {
                a.truncate(1)
            }
        }),
        _ => {}
    }
    for _ in 0..rng.below(3) {
        let k = &keys[rng.below(keys.len())];
        if rng.below(4) == 0 {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), replacement(rng));
        }
    }
    v.to_string()
}

fn no_panic(what: &str, text: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        panic!("{what} panicked on {text}");
    }
}

#[test]
fn mutated_configs_parse_and_build_without_panics() {
    let Some(dir) = testutil::shared_path("fixtures/tiny-sd15-shape") else {
        return;
    };
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(p)).unwrap()).unwrap()
    };
    let (unet, vae, text) = (
        read("unet/config.json"),
        read("vae/config.json"),
        read("text_encoder/config.json"),
    );
    let mut rng = Rng(2026);
    let w = Weights::random(1, DType::F32, &Device::Cpu);
    let p = Path::new("config.json");
    for _ in 0..150 {
        let t = mutate(&unet, &mut rng);
        no_panic("UNet config", &t, || {
            if let Ok(c) = UnetConfig::parse(p, &t) {
                let _ = Unet::new(&w, &c, &Layers::new("fuzz"));
            }
        });
        let t = mutate(&vae, &mut rng);
        no_panic("VAE config", &t, || {
            if let Ok(c) = VaeConfig::parse(p, &t) {
                let _ = Vae::new(&w, &c);
            }
        });
        let t = mutate(&text, &mut rng);
        no_panic("text encoder config", &t, || {
            if let Ok(c) = ClipConfig::parse(p, &t) {
                if c.hidden_size <= 64 && c.vocab_size <= 50_000 {
                    let _ = ClipTextModel::new(&w, &c, &Layers::new("fuzz"));
                }
            }
        });
    }
}

#[test]
fn corrupted_single_files_are_errors() {
    let (Some(file), Some(dir)) = (
        testutil::shared_path("fixtures/single-file/tiny-sd15-shape.safetensors"),
        testutil::shared_path("fixtures/tiny-sd15-shape"),
    ) else {
        return;
    };
    let bytes = std::fs::read(&file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let opts = LoadOptions {
        model_config: Some(dir.display().to_string()),
        ..LoadOptions::default()
    };
    for case in 0..40 {
        let mut b = bytes.clone();
        match case % 4 {
            0 => b.truncate(rng.below(bytes.len())),
            1 => {
                // a byte of the JSON header
                let i = 8 + rng.below(header);
                b[i] = b[i].wrapping_add(1 + rng.below(200) as u8);
            }
            2 => b[..8].copy_from_slice(&(rng.next() % (1 << 40)).to_le_bytes()),
            _ => b.truncate(8 + header + rng.below(bytes.len() - 8 - header)),
        }
        // One file rewritten per case: 40 copies of the 26 MB checkpoint would take 1 GB of disk.
        let p = tmp.path().join("case.safetensors");
        std::fs::write(&p, &b).unwrap();
        let name = p.to_str().unwrap().to_string();
        no_panic("single-file loader", &format!("case {case}"), || {
            let _ = StableDiffusion::load(&name, &opts);
        });
    }
}
