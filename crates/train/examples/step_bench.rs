//! Seconds per training step and peak memory of the real trainer (cached latents and text
//! embeddings, UNet forward and backward to the adapters, AdamW), as one JSON line:
//!
//! ```text
//! cargo run --release -p atomtune-train --example step_bench -- MODEL_DIR IMAGES_DIR METHOD LATENT STEPS [RECIPE]
//! ```
//!
//! `RECIPE`: `plain` (default), `min-snr` (gamma 5), `noise-offset` (0.1), `caption-dropout`
//! (0.1), `ema` (0.999), `prodigy`, `buckets`, `pivotal` (token embedding, lr 5e-4),
//! `masked` (a mask over the left half of each photo, written beside copies of them) or `all`:
//! what each training recipe option costs per step.
//!
//! `LATENT` is the latent side (the training resolution is 8x that). The median is over `STEPS`
//! steps after two warm-up steps. `scripts/bench-train.sh` runs it next to the PyTorch peer.

use std::path::PathBuf;
use std::time::Instant;

use atoms::{AdapterConfig, Method};
use models::{LoadOptions, StableDiffusion, Targets};
use train::{AdamWConfig, LrSchedule, TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    models::tune_process();
    models::on_compute_thread(|| run().map_err(|e| e.to_string()))?;
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args()
        .skip(1)
        .filter(|s| s != "--bench")
        .collect();
    let model = a
        .first()
        .cloned()
        .unwrap_or_else(|| "../shared/fixtures/tiny-sd15-shape".into());
    let images = PathBuf::from(
        a.get(1)
            .cloned()
            .unwrap_or_else(|| "../shared/datasets/dreambooth/dog".into()),
    );
    let method: Method = a.get(2).map_or("atoms", |s| s.as_str()).parse()?;
    let latent: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let steps: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(20);
    let recipe_name = a.get(5).cloned().unwrap_or_else(|| "plain".into());
    let on = |name: &str| recipe_name == name || recipe_name == "all";
    let recipe = train::Recipe {
        min_snr_gamma: on("min-snr").then_some(5.0),
        noise_offset: if on("noise-offset") { 0.1 } else { 0.0 },
        caption_dropout: if on("caption-dropout") { 0.1 } else { 0.0 },
        ema: on("ema").then_some(0.999),
        masked_loss: on("masked"),
        aspect_buckets: on("buckets"),
        token_embedding_lr: on("pivotal").then_some(5e-4),
        optimizer: if on("prodigy") {
            train::OptimizerKind::Prodigy
        } else {
            train::OptimizerKind::AdamW
        },
    };
    if ![
        "plain",
        "min-snr",
        "noise-offset",
        "caption-dropout",
        "ema",
        "prodigy",
        "buckets",
        "pivotal",
        "masked",
        "all",
    ]
    .contains(&recipe_name.as_str())
    {
        return Err(format!(
            "RECIPE {recipe_name}: plain, min-snr, noise-offset, caption-dropout, ema, prodigy, buckets, pivotal, masked or all"
        )
        .into());
    }
    let masked_copy = tempfile_dir_with_masks(&images, recipe.masked_loss)?;
    let images = masked_copy.clone().unwrap_or(images);
    let t0 = Instant::now();
    let sd = StableDiffusion::load(&model, &LoadOptions::default())?;
    let cfg = TrainConfig {
        images,
        token: "sks".into(),
        class_word: "dog".into(),
        instance_prompt: "a photo of {token} {class}".into(),
        resolution: latent * sd.vae.downscale(),
        center_crop: true,
        flip: false,
        repeats: 1,
        skip_bad_images: false,
        prior: None,
        adapter: AdapterConfig::new(method),
        targets: if method == Method::Lora {
            Targets::Attn
        } else {
            Targets::Conv
        },
        lr: 1e-4,
        lr_schedule: LrSchedule::Constant,
        warmup_steps: 0,
        adamw: AdamWConfig::default(),
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        batch_size: 1,
        max_steps: steps + 2,
        seed: 0,
        checkpoint_every: None,
        validation: None,
        out: std::env::temp_dir().join("atomtune-step-bench"),
        loss_scale: Default::default(),
        recipe,
    };
    let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {})?;
    let prepare_s = t0.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let r = t.train_step()?;
        if i >= 2 {
            times.push(r.seconds);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"model\": \"{}\", \"method\": \"{method}\", \"recipe\": \"{recipe_name}\", \"latent\": {latent}, \"median_step_s\": {:.4}, \"min_step_s\": {:.4}, \"steps\": {steps}, \"prepare_s\": {prepare_s:.2}, \"peak_rss_gb\": {:.3}, \"threads\": {}}}",
        std::path::Path::new(&model).file_name().map_or(model.clone(), |f| f.to_string_lossy().into_owned()),
        times[times.len() / 2],
        times[0],
        testutil::peak_rss_gb(),
        candle_core::utils::get_num_threads()
    );
    if let Some(dir) = masked_copy {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// With `on`, a copy of the photos of `images` in a fresh temporary folder, each with a mask
/// over its left half (`name.mask.png`).
fn tempfile_dir_with_masks(
    images: &std::path::Path,
    on: bool,
) -> Result<Option<PathBuf>, Box<dyn std::error::Error>> {
    if !on {
        return Ok(None);
    }
    let dir =
        std::env::temp_dir().join(format!("atomtune-step-bench-masks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for p in train::dataset::image_files(images)? {
        let img = train::dataset::decode(&p)?;
        let name = p.file_name().ok_or("a photo without a name")?;
        std::fs::copy(&p, dir.join(name))?;
        let (w, h) = img.dimensions();
        let mask =
            image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]));
        let stem = p
            .file_stem()
            .ok_or("a photo without a name")?
            .to_string_lossy();
        mask.save(dir.join(format!("{stem}.mask.png")))?;
    }
    Ok(Some(dir))
}
