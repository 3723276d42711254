//! The whole pipeline against diffusers: from the fixtures' initial latents, DDIM 4 steps at
//! guidance 7.5 (`reference.safetensors` `pipe.*`), and every deterministic scheduler's 6-step
//! run, step by step (`reference_schedulers.safetensors`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use models::{LoadOptions, StableDiffusion};
use sample::pipeline::to_rgb8;
use sample::{Pipeline, Request, SchedulerKind};

const FIXTURES: [&str; 2] = ["tiny-sd-2block", "tiny-sd15-shape"];
const PROMPT: &str = "a photo of sks dog";

fn fixture(name: &str) -> Option<PathBuf> {
    testutil::shared_path(&format!("fixtures/{name}"))
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
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

fn request(kind: SchedulerKind, steps: usize, init: &Tensor, size: usize) -> Request {
    Request {
        prompt: PROMPT.into(),
        negative_prompt: None,
        steps,
        guidance: 7.5,
        scheduler: kind,
        width: size,
        height: size,
        seed: 0,
        latents: Some(init.clone()),
    }
}

/// Max difference in 0..255 pixel values between our decode and a reference in `[0, 1]`.
fn pixel_diff(ours_raw: &Tensor, ref01: &Tensor) -> i32 {
    let ours = to_rgb8(ours_raw).unwrap().remove(0).2;
    let r = ((ref01 * 255.0)
        .unwrap()
        .round()
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap())
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    ours.iter()
        .zip(&r)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap()
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn ddim_four_steps_with_guidance_reproduce_diffusers() {
    for kernels in models::Kernels::ALL {
        kernels.scope(ddim_four_steps_reproduce_diffusers);
    }
}

fn ddim_four_steps_reproduce_diffusers() {
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = load(&dir.join("reference.safetensors"));
        let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let p = Pipeline::new(&sd).unwrap();
        assert_eq!(p.default_scheduler(), (SchedulerKind::Ddim, None));
        let size = r["pipe.ddim4.cfg7_5.image"].dim(3).unwrap();
        let out = p
            .generate(
                &request(SchedulerKind::Ddim, 4, &r["pipe.init_latents"], size),
                &mut |_| {},
            )
            .unwrap();
        let e = rel(&out.latents, &r["pipe.ddim4.cfg7_5.latents"]);
        assert!(e < 1e-3, "{name}: latents relative error {e}");
        // the reference image is the raw decode: compare as PNG pixels
        let ref01 = ((&r["pipe.ddim4.cfg7_5.image"] / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let d = pixel_diff(&out.image, &ref01);
        assert!(d <= 2, "{name}: pixels differ by {d}/255");
    }
}

#[test]
fn every_deterministic_scheduler_reproduces_diffusers_step_by_step() {
    let cases = [
        ("euler", SchedulerKind::Euler, None),
        ("dpmpp2m", SchedulerKind::DpmPp2m, None),
        ("dpmpp2m_karras", SchedulerKind::DpmPp2mKarras, None),
        ("pndm", SchedulerKind::Pndm, None),
        ("pndm_plms", SchedulerKind::Pndm, Some("skip_prk_steps")),
    ];
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = load(&dir.join("reference_schedulers.safetensors"));
        for (prefix, kind, flag) in cases {
            let mut sd =
                StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
            if let Some(flag) = flag {
                let mut cfg: serde_json::Value =
                    serde_json::from_str(&sd.scheduler_config.1).unwrap();
                cfg[flag] = serde_json::Value::Bool(true);
                sd.scheduler_config.1 = cfg.to_string();
            }
            let p = Pipeline::new(&sd).unwrap();
            let size = r[&format!("{prefix}.image")].dim(3).unwrap();
            let steps_ref = &r[&format!("{prefix}.step_latents")];
            let mut step_errors = Vec::new();
            let out = p
                .generate(&request(kind, 6, &r["init_latents"], size), &mut |s| {
                    let want = steps_ref.narrow(0, s.done - 1, 1).unwrap();
                    step_errors.push(rel(s.latents, &want));
                })
                .unwrap();
            assert_eq!(
                step_errors.len(),
                steps_ref.dim(0).unwrap(),
                "{name} {prefix}: steps"
            );
            for (i, e) in step_errors.iter().enumerate() {
                assert!(*e < 1e-3, "{name} {prefix}: step {i} relative error {e}");
            }
            let e = rel(&out.latents, &r[&format!("{prefix}.latents")]);
            assert!(e < 1e-3, "{name} {prefix}: final latents error {e}");
            let d = pixel_diff(&out.image, &r[&format!("{prefix}.image")]);
            assert!(d <= 2, "{name} {prefix}: pixels differ by {d}/255");
        }
    }
}
