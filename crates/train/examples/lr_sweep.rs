//! The learning-rate sweep behind `atomtune train`'s defaults: for each method and rate, train on
//! real photos with a tiny fixture model and report the loss on a fixed evaluation set (the
//! training images' mean latents at fixed timesteps and noise) before and after.
//!
//! ```text
//! cargo run --release -p atomtune-train --example lr_sweep -- ../shared/fixtures/tiny-sd15-shape ../shared/datasets/dreambooth/dog [STEPS]
//! ```

use std::path::PathBuf;

use atoms::{AdapterConfig, Method};
use models::{LoadOptions, StableDiffusion, Targets};
use train::{AdamWConfig, LrSchedule, TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    models::tune_process();
    models::on_compute_thread(|| run().map_err(|e| e.to_string()))?;
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| "../shared/fixtures/tiny-sd15-shape".into());
    let images = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "../shared/datasets/dreambooth/dog".into()),
    );
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let out = std::env::temp_dir().join("atomtune-lr-sweep");
    let grid: [(Method, &[f64]); 3] = [
        (Method::Atoms, &[3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
        (Method::AtomsRec, &[1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
        (Method::Lora, &[3e-5, 1e-4, 3e-4, 1e-3, 3e-3]),
    ];
    println!("method\tlr\tloss_before\tloss_after\tratio");
    for (method, lrs) in grid {
        for &lr in lrs {
            let sd = StableDiffusion::load(&model, &LoadOptions::default())?;
            let cfg = TrainConfig {
                images: images.clone(),
                token: "sks".into(),
                class_word: "dog".into(),
                instance_prompt: "a photo of {token} {class}".into(),
                resolution: 128,
                center_crop: true,
                flip: true,
                repeats: 1,
                skip_bad_images: false,
                prior: None,
                adapter: AdapterConfig::new(method),
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
                batch_size: 1,
                max_steps: steps,
                seed: 0,
                checkpoint_every: None,
                validation: None,
                out: out.clone(),
                loss_scale: Default::default(),
                recipe: Default::default(),
            };
            let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {})?;
            let set = t.eval_set(&[100, 300, 500, 700, 900], 1)?;
            let before = t.eval_loss(&set)?;
            for _ in 0..steps {
                t.train_step()?;
            }
            let after = t.eval_loss(&set)?;
            println!(
                "{method}\t{lr:e}\t{before:.5}\t{after:.5}\t{:.3}",
                after / before
            );
        }
    }
    Ok(())
}
