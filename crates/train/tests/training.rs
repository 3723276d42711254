//! Training on the tiny fixtures with real photos: learning happens, `--lr 0` changes nothing,
//! a resumed run ends bit-identical, prior preservation makes exactly the missing class images.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use atoms::{Delta, Method};
use models::{LoadOptions, StableDiffusion};
use train::{AdamWConfig, LrSchedule, PriorConfig, TrainConfig, Trainer};

mod common;
use common::{config, fixture, load, photos};

#[test]
fn the_loss_goes_down_with_training_and_stays_put_at_lr_zero() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(3) else { return };
    let out = tempfile::tempdir().unwrap();
    for (method, lr) in [
        (Method::Atoms, 3e-3),
        (Method::AtomsRec, 3e-3),
        (Method::Lora, 1e-2),
    ] {
        for (lr, steps) in [(lr, 25), (0.0, 5)] {
            let sd = load(&fx);
            let mut t = Trainer::prepare(
                &sd,
                config(imgs.path(), out.path(), method, lr, steps),
                None,
                &mut |_| {},
            )
            .unwrap();
            let set = t.eval_set(&[150, 450, 750], 1).unwrap();
            let before = t.eval_loss(&set).unwrap();
            for _ in 0..steps {
                t.train_step().unwrap();
            }
            let after = t.eval_loss(&set).unwrap();
            if lr == 0.0 {
                assert_eq!(
                    after.to_bits(),
                    before.to_bits(),
                    "{method}: lr 0 changed the loss {before} -> {after}"
                );
            } else {
                assert!(
                    after < 0.95 * before,
                    "{method}: loss {before} -> {after} after 25 steps at lr {lr}"
                );
            }
        }
    }
}

fn delta_bits(p: &Path) -> Vec<(String, Vec<u32>)> {
    let d = Delta::read(p).unwrap();
    d.layers()
        .iter()
        .flat_map(|(l, ts)| {
            ts.iter().map(move |(s, t)| {
                (
                    format!("{l}.{s}"),
                    t.flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect(),
                )
            })
        })
        .collect()
}

fn losses(p: &Path) -> Vec<u64> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .skip(1) // the run's options
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
                .to_bits()
        })
        .collect()
}

/// On SD 1.x and on SDXL (whose examples carry time ids).
#[test]
fn a_resumed_run_ends_bit_identical_to_a_straight_one() {
    let recipe = train::Recipe {
        min_snr_gamma: Some(5.0),
        noise_offset: 0.1,
        caption_dropout: 0.3,
        ema: Some(0.9),
        ..Default::default()
    };
    let prodigy = train::Recipe {
        optimizer: train::OptimizerKind::Prodigy,
        ..Default::default()
    };
    let pivotal = train::Recipe {
        token_embedding_lr: Some(1e-2),
        ema: Some(0.9),
        ..Default::default()
    };
    for (name, recipe) in [
        ("tiny-sd15-shape", train::Recipe::default()),
        ("tiny-sdxl-shape", train::Recipe::default()),
        ("tiny-sd15-shape", recipe),
        ("tiny-sd15-shape", prodigy),
        ("tiny-sdxl-shape", pivotal),
    ] {
        resumed_run_ends_bit_identical(name, recipe);
    }
}

fn resumed_run_ends_bit_identical(name: &str, recipe: train::Recipe) {
    let Some(fx) = testutil::shared_path(&format!("fixtures/{name}")) else {
        return;
    };
    let Some(imgs) = photos(3) else { return };
    let Some(class_src) = testutil::shared_path("datasets/dreambooth/dog2") else {
        return;
    };
    let class_dir = tempfile::tempdir().unwrap();
    for f in ["00.jpg", "01.jpg"] {
        std::fs::copy(class_src.join(f), class_dir.path().join(f)).unwrap();
    }
    let base = |out: &Path, steps: usize| TrainConfig {
        recipe,
        flip: true,
        center_crop: false,
        repeats: 2,
        grad_accum: 2,
        lr_schedule: LrSchedule::Cosine,
        warmup_steps: 2,
        checkpoint_every: Some(3),
        prior: Some(PriorConfig {
            class_prompt: "a photo of dog".into(),
            class_dir: class_dir.path().into(),
            num_class_images: 2,
            weight: 0.5,
            sample_steps: 2,
        }),
        max_steps: steps,
        ..config(imgs.path(), out, Method::Atoms, 2e-3, steps)
    };
    let never = AtomicBool::new(false);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sd = load(&fx);
    train::run(&sd, base(a.path(), 6), None, &never, &mut |_| {}).unwrap();
    // the same run in two halves: 6 steps with a stop request after the third
    let sd = load(&fx);
    let stop = AtomicBool::new(false);
    let mut steps = 0;
    let first = train::run(&sd, base(b.path(), 6), None, &stop, &mut |e| {
        if let train::Event::Step(_) = e {
            steps += 1;
            if steps == 3 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps, 3);
    let ck = train::checkpoint::latest(&b.path().join("checkpoints")).unwrap();
    let sd = load(&fx);
    let second = train::run(&sd, base(b.path(), 6), Some(&ck), &never, &mut |_| {}).unwrap();
    assert!(!second.interrupted);
    assert_eq!(second.steps, 6);
    assert_eq!(
        delta_bits(&a.path().join("delta.safetensors")),
        delta_bits(&b.path().join("delta.safetensors")),
        "{name}"
    );
    assert_eq!(
        losses(&a.path().join("metrics.jsonl")),
        losses(&b.path().join("metrics.jsonl")),
        "{name}"
    );
    // a resume with other settings is refused
    let sd = load(&fx);
    let other = TrainConfig {
        lr: 1e-3,
        ..base(b.path(), 6)
    };
    let e = train::run(&sd, other, Some(&ck), &never, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn prior_preservation_generates_exactly_the_missing_class_images_and_reuses_them() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let Some(class_src) = testutil::shared_path("datasets/dreambooth/dog2") else {
        return;
    };
    let class_dir = tempfile::tempdir().unwrap();
    std::fs::copy(class_src.join("00.jpg"), class_dir.path().join("00.jpg")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        prior: Some(PriorConfig {
            class_prompt: "a photo of dog".into(),
            class_dir: class_dir.path().into(),
            num_class_images: 3,
            weight: 1.0,
            sample_steps: 2,
        }),
        ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 1)
    };
    let count = || std::fs::read_dir(class_dir.path()).unwrap().count();
    let sd = load(&fx);
    let mut infos = Vec::new();
    Trainer::prepare(&sd, cfg.clone(), None, &mut |e| {
        if let train::Event::Info(m) = e {
            infos.push(m)
        }
    })
    .unwrap();
    assert_eq!(count(), 3);
    assert!(
        infos.iter().any(|m| m.contains("generated 2 class images")),
        "{infos:?}"
    );
    let made: Vec<_> = std::fs::read_dir(class_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(made.len(), 2);
    let png = sample::png_io::read_png(&made[0]).unwrap();
    assert!(png.parameters.unwrap().starts_with("a photo of dog"));
    let stamp = std::fs::metadata(&made[0]).unwrap().modified().unwrap();
    // a rerun reuses them
    let sd = load(&fx);
    let mut infos = Vec::new();
    Trainer::prepare(&sd, cfg, None, &mut |e| {
        if let train::Event::Info(m) = e {
            infos.push(m)
        }
    })
    .unwrap();
    assert_eq!(count(), 3);
    assert!(!infos.iter().any(|m| m.contains("generated")));
    assert_eq!(
        std::fs::metadata(&made[0]).unwrap().modified().unwrap(),
        stamp
    );
}

#[test]
fn a_diverging_run_stops_with_an_error_and_keeps_the_last_good_checkpoint() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    // an absurd learning rate: the first update blows the filters up, the next loss is not finite
    let cfg = TrainConfig {
        checkpoint_every: Some(1),
        max_grad_norm: None,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        ..config(imgs.path(), out.path(), Method::Atoms, 1e30, 5)
    };
    let sd = load(&fx);
    let e = train::run(&sd, cfg, None, &AtomicBool::new(false), &mut |_| {})
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        matches!(e, train::Error::NonFinite { step: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("step-000001") && msg.contains("--lr"), "{msg}");
    let ck = train::checkpoint::read(&out.path().join("checkpoints/step-000001")).unwrap();
    assert_eq!(ck.state.step, 1);
    assert!(!out.path().join("checkpoints/step-000002").exists());
}

/// Half-precision weights train f32 adapter parameters with an f32 loss.
#[test]
fn half_precision_models_train_f32_adapters() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        let sd = StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
        let mut t = Trainer::prepare(
            &sd,
            config(imgs.path(), out.path(), Method::Atoms, 1e-3, 2),
            None,
            &mut |_| {},
        )
        .unwrap();
        assert!(sd
            .unet
            .layers()
            .vars()
            .iter()
            .all(|v| v.dtype() == candle_core::DType::F32));
        for _ in 0..2 {
            let r = t.train_step().unwrap();
            assert!(r.loss.is_finite() && r.grad_norm > 0.0, "{dtype:?}: {r:?}");
        }
        let d = t.delta().unwrap();
        assert_eq!(d.num_params(), 4257);
    }
}

/// What the adapters attached to `sd` change in every weight, `W' - W`, in f32, layers in
/// order: the delta's effect on the model. (Raw atom updates `dD` are a poor measure of how
/// close two runs are: AdamW moves every entry by about the learning rate whatever its
/// gradient's size, so entries whose gradient is rounding noise, the atoms of little energy,
/// take random signs; they barely change `W'`.)
fn weight_changes(sd: &StableDiffusion) -> Vec<f32> {
    use atoms::Adapter;
    let layers = sd.unet.layers();
    layers
        .adapted()
        .iter()
        .flat_map(|name| {
            let base = layers.get(name).unwrap().weight;
            layers.adapters(name).into_iter().flat_map(move |(a, s)| {
                a.delta_weight(&base, s)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        })
        .collect()
}

/// `|a - b| / |a|` over all entries.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += ((x - y) as f64).powi(2);
        n += (*x as f64).powi(2);
    }
    assert!(n > 0.0, "nothing changed");
    (d / n).sqrt()
}

/// An f16 model trains with the dynamic loss scale (the portable kernels: the CPU's fused ones
/// are f32/f64): its losses follow the f32 run's within a few percent, and what its delta does to
/// the weights, the f32 delta's within 10% (measured: 3%). At 128 px: at 64 px the fixture's
/// lowest level is 1x1, where a group norm of a few numbers turns f16 rounding into gradients of
/// the wrong size (f32 itself is ill-conditioned there).
#[test]
fn f16_training_with_a_loss_scale_tracks_f32() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    let run = |dtype| {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        let sd = StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
        let cfg = TrainConfig {
            resolution: 128,
            ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 8)
        };
        let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {}).unwrap();
        let reports: Vec<_> = (0..8).map(|_| t.train_step().unwrap()).collect();
        (reports, weight_changes(&sd))
    };
    let (r32, w32) = run(candle_core::DType::F32);
    let (r16, w16) = run(candle_core::DType::F16);
    for (a, b) in r32.iter().zip(&r16) {
        assert_eq!(a.loss_scale, None);
        assert_eq!(b.loss_scale, Some(65536.0));
        assert!(!b.skipped, "{b:?}");
        let rel = (a.loss - b.loss).abs() / a.loss;
        assert!(
            rel < 0.03,
            "step {}: loss {} (f32) vs {} (f16)",
            a.step,
            a.loss,
            b.loss
        );
    }
    let rel = rel_l2(&w32, &w16);
    eprintln!("f16 weight changes relative to f32: {rel:.3e}");
    assert!(
        rel < 0.1,
        "the f16 run's weight changes are off the f32 run's by {rel}"
    );
}

/// A loss scale too large for f16 overflows the backward: the step is skipped (the adapters and
/// the optimizer stay as they were), the scale halves, and a checkpoint keeps the scale so that a
/// resumed run goes on from it.
#[test]
fn an_overflow_skips_the_step_and_lowers_the_scale() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        dtype: candle_core::DType::F16,
        ..Default::default()
    };
    let cfg = TrainConfig {
        loss_scale: train::LossScaleConfig {
            init: 1e30,
            ..Default::default()
        },
        ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 4)
    };
    let sd = StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
    let mut t = Trainer::prepare(&sd, cfg.clone(), None, &mut |_| {}).unwrap();
    let r1 = t.train_step().unwrap();
    assert!(r1.skipped && r1.loss.is_finite(), "{r1:?}");
    assert_eq!(r1.loss_scale, Some(1e30));
    assert!(weight_changes(&sd).iter().all(|&x| x == 0.0));
    let r2 = t.train_step().unwrap();
    assert_eq!(r2.loss_scale, Some(5e29));
    let ck = t.checkpoint().unwrap();
    let state = train::checkpoint::read(&ck).unwrap().state;
    assert_eq!(state.loss_scale.map(|s| s.scale), Some(2.5e29));
    drop(t);
    let sd = StableDiffusion::load(fx.to_str().unwrap(), &opts).unwrap();
    let mut t = Trainer::prepare(&sd, cfg, Some(&ck), &mut |_| {}).unwrap();
    assert_eq!(t.train_step().unwrap().loss_scale, Some(2.5e29));
}

/// SDXL's time ids of each drawn example, as diffusers' SDXL DreamBooth script makes them: the
/// photo's size before resizing, where the crop starts in the resized image (a random latent
/// crop of an image kept whole, in whole latent cells; the center crop's offset otherwise), and
/// the training size.
#[test]
fn each_example_carries_its_photo_size_and_crop_as_time_ids() {
    use train::cache::LatentCache;
    use train::dataset::{load_folder, ImageOptions};
    let Some(fx) = testutil::shared_path("fixtures/tiny-sdxl-shape") else {
        return;
    };
    let Some(imgs) = photos(1) else { return };
    // and a portrait one, 400x512: its random crops move down the image
    let photo = train::dataset::decode(&imgs.path().join("00.jpg")).unwrap();
    image::imageops::crop_imm(&photo, 50, 0, 400, 512)
        .to_image()
        .save(imgs.path().join("01.png"))
        .unwrap();
    let sd = load(&fx);
    for center_crop in [false, true] {
        let opts = ImageOptions {
            resolution: 64,
            center_crop,
            skip_bad: false,
            masks: false,
            aspect_buckets: false,
        };
        let images = load_folder(imgs.path(), opts, &mut |_| {}).unwrap();
        let captions = vec!["a photo of sks dog".to_string(); images.len()];
        let cache = LatentCache::build(&sd, &images, &captions, true, &mut |_, _| {}).unwrap();
        let mut rng = sample::NoiseRng::new(3);
        for (i, img) in images.iter().enumerate() {
            let decoded = train::dataset::decode(&img.path).unwrap();
            let (h, w) = (decoded.height() as usize, decoded.width() as usize);
            let (rh, rw) = (img.rgb.height() as usize, img.rgb.width() as usize);
            let mut tops = std::collections::BTreeSet::new();
            for k in 0..12 {
                let d = cache.draw(i, k % 2 == 1, &mut rng).unwrap();
                assert_eq!(d.latent.dims(), &[1, 4, 8, 8]);
                let ids: Vec<usize> = d
                    .time_ids
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&x| x as usize)
                    .collect();
                assert_eq!(
                    &ids[0..2],
                    &[h, w],
                    "original size of {}",
                    img.path.display()
                );
                assert_eq!(&ids[4..6], &[64, 64]);
                let (top, left) = (ids[2], ids[3]);
                if center_crop {
                    assert_eq!((top, left), img.crop);
                } else {
                    assert!(top % 8 == 0 && left % 8 == 0 && top + 64 <= rh && left + 64 <= rw);
                    tops.insert((top, left));
                }
            }
            if !center_crop && rh > 64 {
                assert!(tops.len() > 1, "random crops should vary: {tops:?}");
            }
            if center_crop && rh > 64 {
                assert!(
                    img.crop.0 > 0,
                    "the center crop of a portrait starts below the top"
                );
            }
        }
    }
}

/// Min-SNR weights each example's loss by min(SNR, gamma) / SNR (epsilon prediction), SNR from
/// the scaled-linear schedule worked out here by hand; on a fixed evaluation set at one timestep
/// the weighted loss is the plain one times that weight.
#[test]
fn min_snr_weights_the_loss_as_its_formula_says() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    // alpha_bar at t = 200 of SD's schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2
    let t = 200usize;
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let ab: f64 = (0..=t)
        .map(|i| 1.0 - (a + (b - a) * i as f64 / 999.0).powi(2))
        .product();
    let snr = ab / (1.0 - ab);
    let gamma = 0.5; // below this timestep's SNR: the weight is gamma / snr < 1
    assert!(snr > gamma);
    let want = gamma / snr;
    let loss = |recipe: train::Recipe| {
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            recipe,
            ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 1)
        };
        let sd = load(&fx);
        let tr = Trainer::prepare(&sd, cfg, None, &mut |_| {}).unwrap();
        let set = tr.eval_set(&[t], 5).unwrap();
        tr.eval_loss(&set).unwrap()
    };
    let plain = loss(train::Recipe::default());
    let weighted = loss(train::Recipe {
        min_snr_gamma: Some(gamma),
        ..Default::default()
    });
    let ratio = weighted / plain;
    assert!(
        (ratio - want).abs() / want < 1e-4,
        "ratio {ratio} vs {want}"
    );
    assert!(
        (train::recipe::min_snr_weight(ab, 5.0, sample::schedulers::Prediction::Epsilon) - 1.0)
            .abs()
            < 1e-12,
        "an SNR below gamma keeps its weight"
    );
}

/// Offset noise is the standard noise plus `offset` times one draw per example and channel.
#[test]
fn offset_noise_adds_a_per_channel_constant() {
    use candle_core::{DType, Device, Tensor};
    let recipe = train::Recipe {
        noise_offset: 0.1,
        ..Default::default()
    };
    let x0 = Tensor::zeros((2, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let got = recipe.noise(&mut sample::NoiseRng::new(9), &x0).unwrap();
    let mut rng = sample::NoiseRng::new(9);
    let eps = rng.randn(&[2, 4, 3, 5], DType::F32, &Device::Cpu).unwrap();
    let off = rng.randn(&[2, 4, 1, 1], DType::F32, &Device::Cpu).unwrap();
    let want = eps.broadcast_add(&(off * 0.1).unwrap()).unwrap();
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // off: the plain draw, nothing more
    let plain = train::Recipe::default()
        .noise(&mut sample::NoiseRng::new(9), &x0)
        .unwrap();
    let eps = sample::NoiseRng::new(9)
        .randn(&[2, 4, 3, 5], DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(
        (plain - eps)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for bad in [
        train::Recipe {
            min_snr_gamma: Some(0.0),
            ..Default::default()
        },
        train::Recipe {
            noise_offset: -1.0,
            ..Default::default()
        },
        train::Recipe {
            caption_dropout: 1.5,
            ..Default::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// With every caption dropped the model trains on the empty text: another loss than with the
/// captions, and the delta records the option.
#[test]
fn caption_dropout_trains_on_the_empty_text_and_is_recorded() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let run = |p: f64| {
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            recipe: train::Recipe {
                caption_dropout: p,
                ..Default::default()
            },
            ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 1)
        };
        let sd = load(&fx);
        let never = AtomicBool::new(false);
        train::run(&sd, cfg, None, &never, &mut |_| {}).unwrap();
        let d = Delta::read(&out.path().join("delta.safetensors")).unwrap();
        (
            losses(&out.path().join("metrics.jsonl")),
            d.meta().extra.get("caption_dropout").cloned(),
        )
    };
    let (with, recorded) = run(1.0);
    let (without, none) = run(0.0);
    assert_ne!(with, without);
    assert_eq!((recorded.as_deref(), none), (Some("1"), None));
}

/// `--ema`: the delta a run writes is the moving average of the parameters after each step,
/// worked out here from the raw parameters of every step.
#[test]
fn the_ema_delta_is_the_moving_average_of_the_steps() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    let decay = 0.8;
    let cfg = TrainConfig {
        recipe: train::Recipe {
            ema: Some(decay),
            ..Default::default()
        },
        ..config(imgs.path(), out.path(), Method::Atoms, 1e-2, 4)
    };
    let sd = load(&fx);
    let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {}).unwrap();
    let flat = |d: &Delta| -> Vec<f32> {
        let mut v = Vec::new();
        for tensors in d.layers().values() {
            for x in tensors.values() {
                v.extend(x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        v
    };
    let mut ema = flat(&t.delta().unwrap());
    for _ in 0..4 {
        t.train_step().unwrap();
        let raw = flat(&t.delta().unwrap());
        for (e, r) in ema.iter_mut().zip(&raw) {
            *e = decay as f32 * *e + (1.0 - decay as f32) * r;
        }
    }
    let raw = flat(&t.delta().unwrap());
    let got = flat(&t.output_delta().unwrap());
    let err = got
        .iter()
        .zip(&ema)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = ema.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(
        scale > 0.0 && err <= 1e-6 * scale.max(1.0),
        "ema error {err} (scale {scale})"
    );
    assert_ne!(got, raw, "the average is not the last step");
    // the raw parameters are untouched by writing the average
    assert_eq!(flat(&t.delta().unwrap()), raw);
}

/// Writes `name.mask.png` beside photo `name.jpg` (512x512): white where `learn(x, y)`.
fn write_mask(dir: &Path, name: &str, learn: impl Fn(u32, u32) -> bool) {
    let m = image::GrayImage::from_fn(512, 512, |x, y| {
        image::Luma([if learn(x, y) { 255 } else { 0 }])
    });
    m.save(dir.join(format!("{name}.mask.png"))).unwrap();
}

/// `--masked-loss`: the loss is the mean over where the mask is. With the left and the right
/// half masked in turn, their mean is the unmasked loss (the same examples, timestep and noise);
/// with a mask that is empty the loss and every gradient are zero; mask files are not photos.
#[test]
fn masked_loss_is_the_mean_where_the_mask_is() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(1) else { return };
    let loss = |mask: Option<&dyn Fn(u32, u32) -> bool>| -> (f64, f64) {
        let _ = std::fs::remove_file(imgs.path().join("00.mask.png"));
        if let Some(m) = mask {
            write_mask(imgs.path(), "00", m);
        }
        let out = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            recipe: train::Recipe {
                masked_loss: mask.is_some(),
                ..Default::default()
            },
            ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 1)
        };
        let sd = load(&fx);
        let mut t = Trainer::prepare(&sd, cfg, None, &mut |_| {}).unwrap();
        let set = t.eval_set(&[500], 3).unwrap();
        let l = t.eval_loss(&set).unwrap();
        let r = t.train_step().unwrap();
        (l, r.grad_norm)
    };
    let (plain, _) = loss(None);
    let (left, _) = loss(Some(&|x, _| x < 256));
    let (right, _) = loss(Some(&|x, _| x >= 256));
    let mean = (left + right) / 2.0;
    assert!(
        (mean - plain).abs() / plain < 1e-5,
        "{left} and {right} average {mean}, unmasked {plain}"
    );
    assert!((left - right).abs() > 1e-6, "the halves differ");
    let (zero, grad) = loss(Some(&|_, _| false));
    assert_eq!((zero, grad), (0.0, 0.0));
    assert_eq!(
        train::dataset::image_files(imgs.path()).unwrap().len(),
        1,
        "a mask is not a photo"
    );
}

/// `--aspect-buckets`: landscape, portrait, square and small photos keep their shapes (the
/// encoded latents and drawn examples have their buckets' sizes, the time ids say so), none is
/// upscaled, and a run with batches of two trains, printing the buckets and warning of one too
/// small for a batch. On the SDXL fixture, with prior preservation (square class images).
#[test]
fn aspect_buckets_keep_each_photos_shape() {
    use train::cache::LatentCache;
    use train::dataset::{load_folder, ImageOptions};
    let Some(fx) = testutil::shared_path("fixtures/tiny-sdxl-shape") else {
        return;
    };
    let Some(imgs) = photos(1) else { return };
    let photo = train::dataset::decode(&imgs.path().join("00.jpg")).unwrap();
    std::fs::remove_file(imgs.path().join("00.jpg")).unwrap();
    // name, crop of the photo (x, y, w, h), the bucket (w, h) at resolution 256
    let cases = [
        ("land-a.png", (0, 50, 450, 300), (320, 192)),
        ("land-b.png", (20, 80, 450, 300), (320, 192)),
        ("portrait.png", (50, 0, 300, 450), (192, 320)),
        ("square.png", (0, 0, 400, 400), (256, 256)),
        // smaller than every bucket: its own size cut to multiples of 64
        ("small.png", (0, 0, 150, 100), (128, 64)),
    ];
    for (name, (x, y, w, h), _) in cases {
        image::imageops::crop_imm(&photo, x, y, w, h)
            .to_image()
            .save(imgs.path().join(name))
            .unwrap();
    }
    let sd = load(&fx);
    let f = sd.vae.downscale();
    let opts = ImageOptions {
        resolution: 256,
        center_crop: false,
        skip_bad: false,
        masks: false,
        aspect_buckets: true,
    };
    let images = load_folder(imgs.path(), opts, &mut |_| {}).unwrap();
    let captions = vec!["a photo of sks dog".to_string(); images.len()];
    let cache = LatentCache::build(&sd, &images, &captions, false, &mut |_, _| {}).unwrap();
    let mut rng = sample::NoiseRng::new(1);
    for (i, img) in images.iter().enumerate() {
        let name = img.path.file_name().unwrap().to_str().unwrap();
        let (_, crop, (bw, bh)) = cases.iter().find(|c| c.0 == name).unwrap();
        assert_eq!(img.size, (*bh as usize, *bw as usize), "{name}");
        let (rw, rh) = img.rgb.dimensions();
        assert!(
            rw >= *bw && rh >= *bh,
            "{name}: {rw}x{rh} covers the bucket"
        );
        assert!(
            rw <= crop.2 && rh <= crop.3,
            "{name} was upscaled to {rw}x{rh}"
        );
        let d = cache.draw(i, false, &mut rng).unwrap();
        assert_eq!(
            d.latent.dims(),
            &[1, 4, *bh as usize / f, *bw as usize / f],
            "{name}"
        );
        let ids = d.time_ids.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((ids[4], ids[5]), (*bh as f32, *bw as f32), "{name}");
    }
    // a run: batches of two from one bucket, class images (square) beside them
    let class_dir = tempfile::tempdir().unwrap();
    photo.save(class_dir.path().join("c.png")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        resolution: 256,
        center_crop: false,
        flip: true,
        recipe: train::Recipe {
            aspect_buckets: true,
            ..Default::default()
        },
        prior: Some(PriorConfig {
            class_prompt: "a photo of dog".into(),
            class_dir: class_dir.path().into(),
            num_class_images: 1,
            weight: 1.0,
            sample_steps: 2,
        }),
        ..config(imgs.path(), out.path(), Method::Atoms, 1e-3, 3)
    };
    let (mut infos, mut warns) = (Vec::new(), Vec::new());
    let never = AtomicBool::new(false);
    train::run(&sd, cfg, None, &never, &mut |e| match e {
        train::Event::Info(s) => infos.push(s),
        train::Event::Warn(s) => warns.push(s),
        _ => {}
    })
    .unwrap();
    let line = infos.iter().find(|l| l.contains("aspect buckets")).unwrap();
    for b in ["128x64: 1", "192x320: 1", "256x256: 1", "320x192: 2"] {
        assert!(line.contains(b), "{line}");
    }
    assert!(
        warns
            .iter()
            .any(|w| w.contains("192x320") && w.contains("--batch-size 2")),
        "{warns:?}"
    );
    let d = Delta::read(&out.path().join("delta.safetensors")).unwrap();
    assert_eq!(
        d.meta().extra.get("aspect_buckets").map(String::as_str),
        Some("true")
    );
}

/// Samples `prompt` (2 Euler steps, 64x64, seed 5) with `sd` as it is; the latents.
fn sample_latents(sd: &StableDiffusion, prompt: &str) -> Vec<f32> {
    let pipe = sample::Pipeline::new(sd).unwrap();
    let req = sample::Request {
        prompt: prompt.into(),
        negative_prompt: None,
        steps: 2,
        guidance: 7.5,
        scheduler: pipe.default_scheduler().0,
        width: 64,
        height: 64,
        seed: 5,
        latents: None,
    };
    let g = pipe.generate(&req, &mut |_| {}).unwrap();
    g.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `--train-token-embedding` with the atoms frozen (`--lr 0`): the trigger `<sks>` becomes a
/// new token whose embedding (started at the class word's) trains alone and is stored in the
/// delta; sampling with the delta moves the image where the prompt has the trigger, and only
/// there (the atoms did not move).
#[test]
fn pivotal_tuning_moves_the_image_through_the_embedding_alone() {
    let Some(fx) = fixture() else { return };
    let Some(imgs) = photos(2) else { return };
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        token: "<sks>".into(),
        recipe: train::Recipe {
            token_embedding_lr: Some(5e-2),
            ..Default::default()
        },
        ..config(imgs.path(), out.path(), Method::Atoms, 0.0, 4)
    };
    let sd = load(&fx);
    let class_row = sd.text.word_embedding("dog", &sd.id).unwrap().remove(0);
    let never = AtomicBool::new(false);
    train::run(&sd, cfg, None, &never, &mut |_| {}).unwrap();
    let delta = Delta::read(&out.path().join("delta.safetensors")).unwrap();
    let row = &delta.embeddings()["text_encoder"];
    let hidden = sd.text.first.model.config().hidden_size;
    assert_eq!(row.dims(), &[hidden]);
    assert_eq!(delta.embeddings().len(), 1, "one text encoder");
    assert_eq!(delta.meta().trigger.as_deref(), Some("<sks>"));
    let moved = (row - &class_row)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moved > 1e-3,
        "the embedding stayed at the class word's ({moved})"
    );

    let with_trigger = "a photo of <sks> dog";
    let base = load(&fx);
    let (base_trigger, base_plain) = (
        sample_latents(&base, with_trigger),
        sample_latents(&base, "a photo of dog"),
    );
    let tuned = load(&fx);
    sample::pipeline::apply_deltas(
        &tuned,
        &[(atoms::kohya::AnyDelta::Atomtune(Box::new(delta)), 1.0)],
        false,
    )
    .unwrap();
    let ids = tuned.text.first.tokenizer.as_ref().unwrap();
    let tokens = ids.encode(with_trigger, false).unwrap().ids;
    let vocab = tuned.text.first.model.config().vocab_size as u32;
    assert_eq!(
        tokens.iter().filter(|&&t| t == vocab).count(),
        1,
        "{tokens:?}"
    );
    let diff = sample_latents(&tuned, with_trigger)
        .iter()
        .zip(&base_trigger)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-3,
        "the learned token did not move the image ({diff})"
    );
    assert_eq!(
        sample_latents(&tuned, "a photo of dog"),
        base_plain,
        "without the trigger the image is the base model's"
    );
    // a second delta with the same trigger is refused
    let again = Delta::read(&out.path().join("delta.safetensors")).unwrap();
    let e = sample::pipeline::apply_deltas(
        &tuned,
        &[(atoms::kohya::AnyDelta::Atomtune(Box::new(again)), 1.0)],
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("same trigger"), "{e}");
}
