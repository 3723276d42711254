//! The SDXL pipeline against diffusers' `StableDiffusionXLPipeline` on `tiny-sdxl-shape`: the
//! prompt embeddings of every text, the negative-prompt rules (none: zeros; "": encoded), and five
//! 6-step runs from the fixture's initial latents, step by step and as PNG pixels.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use models::{Architecture, LoadOptions, StableDiffusion};
use sample::pipeline::to_rgb8;
use sample::{Pipeline, Request, SchedulerKind};

const PROMPT: &str = "a photo of sks dog";

fn fixture() -> Option<PathBuf> {
    testutil::shared_path("fixtures/tiny-sdxl-shape")
}

fn reference(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max(&(a - b).unwrap()) / max(b).max(1e-12)
}

/// Max difference in 0..255 pixel values between our decode and a raw reference decode.
fn pixel_diff(ours_raw: &Tensor, ref_raw: &Tensor) -> i32 {
    let a = to_rgb8(ours_raw).unwrap().remove(0).2;
    let b = to_rgb8(ref_raw).unwrap().remove(0).2;
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .max()
        .unwrap()
}

#[test]
fn an_sdxl_folder_loads_as_sdxl() {
    let Some(dir) = fixture() else { return };
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(sd.architecture, Architecture::Sdxl);
    assert!(sd.text.is_dual());
    assert!(sd.force_zeros_for_empty_prompt);
    assert_eq!(sd.vae.scaling_factor(), 0.13025);
}

#[test]
fn prompt_embeddings_match_encode_prompt() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    for (name, text) in [
        ("sks", PROMPT),
        ("empty", ""),
        ("blurry", "blurry"),
        ("caps", "A PHOTO, of SKS dog!!"),
        ("class", "a photo of dog"),
    ] {
        let (e, _) = sd.encode(&[text]).unwrap();
        let err = rel(&e.context, &r[&format!("text.{name}.prompt_embeds")]);
        assert!(err < 1e-4, "{name}: prompt_embeds {err}");
        let err = rel(
            e.pooled.as_ref().unwrap(),
            &r[&format!("text.{name}.pooled_prompt_embeds")],
        );
        assert!(err < 1e-4, "{name}: pooled_prompt_embeds {err}");
    }
}

/// Each run: its key, scheduler, guidance and negative prompt (as the fixture's metadata says).
fn runs() -> [(&'static str, SchedulerKind, f64, Option<&'static str>); 5] {
    [
        ("euler6.cfg5_0", SchedulerKind::Euler, 5.0, Some("blurry")),
        ("euler6.cfg5_0.negnone", SchedulerKind::Euler, 5.0, None),
        (
            "euler6.cfg5_0.negempty",
            SchedulerKind::Euler,
            5.0,
            Some(""),
        ),
        (
            "dpmpp2m_karras6.cfg7_0",
            SchedulerKind::DpmPp2mKarras,
            7.0,
            Some("blurry"),
        ),
        ("ddim6.cfg1_0", SchedulerKind::Ddim, 1.0, Some("blurry")),
    ]
}

/// With each kernel choice: the fused CPU kernels and the portable code a GPU runs.
#[test]
fn five_pipeline_runs_reproduce_diffusers_within_2_of_255() {
    for kernels in models::Kernels::ALL {
        kernels.scope(five_runs_reproduce_diffusers);
    }
}

fn five_runs_reproduce_diffusers() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let p = Pipeline::new(&sd).unwrap();
    assert_eq!(p.default_scheduler(), (SchedulerKind::Euler, None));
    let kernels = models::Kernels::current().unwrap();
    for (key, kind, guidance, negative) in runs() {
        let k = |s: &str| format!("pipe.{key}.{s}");
        let req = Request {
            prompt: PROMPT.into(),
            negative_prompt: negative.map(String::from),
            steps: 6,
            guidance,
            scheduler: kind,
            width: 128,
            height: 128,
            seed: 0,
            latents: Some(r["pipe.init_latents"].clone()),
        };
        let steps_ref = &r[&k("step_latents")];
        let mut worst = 0f32;
        let out = p
            .generate(&req, &mut |s| {
                let want = steps_ref.narrow(0, s.done - 1, 1).unwrap();
                worst = worst.max(rel(s.latents, &want));
            })
            .unwrap();
        assert!(worst < 1e-3, "{kernels} {key}: step latents error {worst}");
        let e = rel(&out.latents, &r[&k("latents")]);
        assert!(e < 1e-3, "{kernels} {key}: latents error {e}");
        let d = pixel_diff(&out.image, &r[&k("image")].affine(2.0, -1.0).unwrap());
        eprintln!("{kernels} {key}: step latents {worst:.1e}, pixels {d}/255");
        assert!(d <= 2, "{kernels} {key}: pixels differ by {d}/255");
    }
}

/// No negative prompt gives zero unconditional embeddings (diffusers'
/// `force_zeros_for_empty_prompt`), unlike the negative prompt "", which is encoded.
#[test]
fn no_negative_prompt_is_zeros_and_empty_is_encoded() {
    let Some(dir) = fixture() else { return };
    let r = reference(&dir);
    let zeros = &r["pipe.euler6.cfg5_0.negnone.negative_prompt_embeds"];
    assert_eq!(
        zeros
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let (empty, _) = sd.encode(&[""]).unwrap();
    let e = rel(
        &empty.context,
        &r["pipe.euler6.cfg5_0.negempty.negative_prompt_embeds"],
    );
    assert!(e < 1e-4, "{e}");
}
