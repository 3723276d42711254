//! What the trainer's test binaries share: the fixture, photos of the DreamBooth dog, a small
//! training configuration.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use atoms::{AdapterConfig, Method};
use models::{LoadOptions, StableDiffusion, Targets};
use train::{AdamWConfig, LrSchedule, TrainConfig};

pub fn fixture() -> Option<PathBuf> {
    testutil::shared_path("fixtures/tiny-sd15-shape")
}

/// A folder with `n` photos of the DreamBooth `dog` subject (real JPEGs of odd sizes).
pub fn photos(n: usize) -> Option<tempfile::TempDir> {
    let src = testutil::shared_path("datasets/dreambooth/dog")?;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        let name = format!("{i:02}.jpg");
        std::fs::copy(src.join(&name), dir.path().join(&name)).unwrap();
    }
    Some(dir)
}

pub fn load(fx: &Path) -> StableDiffusion {
    StableDiffusion::load(fx.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

pub fn config(images: &Path, out: &Path, method: Method, lr: f64, steps: usize) -> TrainConfig {
    TrainConfig {
        images: images.into(),
        token: "sks".into(),
        class_word: "dog".into(),
        instance_prompt: "a photo of {token} {class}".into(),
        resolution: 64,
        center_crop: true,
        flip: false,
        repeats: 1,
        skip_bad_images: false,
        prior: None,
        adapter: AdapterConfig {
            rank: 4,
            ..AdapterConfig::new(method)
        },
        targets: if method == Method::Lora {
            Targets::Attn
        } else {
            Targets::Conv
        },
        lr,
        lr_schedule: LrSchedule::Constant,
        warmup_steps: 0,
        adamw: AdamWConfig::default(),
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        batch_size: 2,
        max_steps: steps,
        seed: 7,
        checkpoint_every: None,
        validation: None,
        out: out.into(),
        loss_scale: Default::default(),
        recipe: Default::default(),
    }
}
