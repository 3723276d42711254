//! Scheduler schedules and single steps against diffusers' (`reference.safetensors` `sched.*` and
//! `reference_schedulers.safetensors`), built from the fixture's own scheduler config the way
//! the reference built them (`Class.from_config(pipe.scheduler.config, **kwargs)`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sample::schedulers::{NoiseSchedule, SchedulerConfig, SchedulerKind};
use sample::{noise, NoiseRng};

const FIXTURES: [&str; 2] = ["tiny-sd-2block", "tiny-sd15-shape"];

fn fixture(name: &str) -> Option<PathBuf> {
    testutil::shared_path(&format!("fixtures/{name}"))
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn config(dir: &Path, sub: &str) -> SchedulerConfig {
    let p = dir.join(sub).join("scheduler_config.json");
    SchedulerConfig::parse(&p, &std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
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

#[test]
fn noise_schedule_and_ddim_match_diffusers() {
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = load(&dir.join("reference.safetensors"));
        let c = config(&dir, "scheduler");
        let s = NoiseSchedule::from_config(&c).unwrap();
        let want = r["sched.alphas_cumprod"].to_vec1::<f32>().unwrap();
        for (i, (a, b)) in s.alphas_cumprod.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b,
                "{name} alphas_cumprod[{i}]: {a} vs {b}"
            );
        }
        let ddim = SchedulerKind::Ddim.build(&c, 50).unwrap();
        assert_eq!(
            ddim.timesteps(),
            f64s(&r["sched.ddim50.timesteps"]).as_slice(),
            "{name}"
        );
        let mut ddim = SchedulerKind::Ddim.build(&c, 50).unwrap();
        let t = f64s(&r["sched.ddim50.step.t"])[0];
        let i = ddim.timesteps().iter().position(|&x| x == t).unwrap();
        let prev = ddim
            .step(
                &r["sched.ddim50.step.eps"],
                i,
                &r["sched.ddim50.step.x_t"],
                &mut NoiseRng::new(0),
            )
            .unwrap();
        let e = max_rel(&prev, &r["sched.ddim50.step.prev"]);
        assert!(e < 1e-5, "{name} DDIM step: {e}");
        // DDPM's forward process, from its own config.
        let ddpm = NoiseSchedule::from_config(&config(&dir, "scheduler_ddpm")).unwrap();
        let t: Vec<usize> = f64s(&r["sched.ddpm.add_noise.t"])
            .iter()
            .map(|&x| x as usize)
            .collect();
        let out = noise::add_noise(
            &ddpm,
            &r["sched.ddpm.add_noise.x0"],
            &r["sched.ddpm.add_noise.noise"],
            &t,
        )
        .unwrap();
        let e = max_rel(&out, &r["sched.ddpm.add_noise.out"]);
        assert!(e < 1e-6, "{name} add_noise: {e}");
    }
}

#[test]
fn every_scheduler_schedule_matches_diffusers() {
    let cases = [
        ("euler", SchedulerKind::Euler),
        ("euler_a", SchedulerKind::EulerAncestral),
        ("dpmpp2m", SchedulerKind::DpmPp2m),
        ("dpmpp2m_karras", SchedulerKind::DpmPp2mKarras),
        ("pndm", SchedulerKind::Pndm),
        ("ddpm_steps", SchedulerKind::Ddpm),
    ];
    for name in FIXTURES {
        let Some(dir) = fixture(name) else { return };
        let r = load(&dir.join("reference_schedulers.safetensors"));
        let c = config(&dir, "scheduler");
        for (prefix, kind) in cases {
            let s = kind.build(&c, 6).unwrap();
            let want = f64s(&r[&format!("{prefix}.timesteps")]);
            assert_eq!(s.timesteps().len(), want.len(), "{name} {prefix}");
            for (a, b) in s.timesteps().iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{name} {prefix} timesteps {:?} vs {want:?}",
                    s.timesteps()
                );
            }
            let init = f64s(&r[&format!("{prefix}.init_noise_sigma")])[0];
            assert!(
                (s.init_noise_sigma() - init).abs() <= 1e-5 * init,
                "{name} {prefix} init sigma"
            );
            if let Some(key) = Some(format!("{prefix}.sigmas")).filter(|k| r.contains_key(k)) {
                let want = f64s(&r[&key]);
                let got = s.sigmas().unwrap();
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * b.abs().max(1e-3),
                        "{name} {prefix} sigmas {got:?} vs {want:?}"
                    );
                }
            }
        }
        // The SD 1.5 hub setting of PNDM: PLMS only.
        let plms = SchedulerKind::Pndm
            .build(
                &c.clone()
                    .with("skip_prk_steps", serde_json::Value::Bool(true)),
                6,
            )
            .unwrap();
        assert_eq!(plms.timesteps(), f64s(&r["pndm_plms.timesteps"]).as_slice());
    }
}

#[test]
fn configs_follow_from_config_rules() {
    let p = Path::new("scheduler_config.json");
    // Unknown keys are ignored; missing keys take the scheduler's own defaults (DDIM: linear betas).
    let c = SchedulerConfig::parse(p, r#"{"_class_name": "X", "some_key": 3}"#).unwrap();
    let s = NoiseSchedule::from_config(&c).unwrap();
    assert!((s.alphas_cumprod[0] - (1.0 - 0.0001)).abs() < 1e-7);
    // Keys listed as defaults of the scheduler that saved the file count as absent.
    let c = SchedulerConfig::parse(
        p,
        r#"{"timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    let euler = SchedulerKind::Euler.build(&c, 4).unwrap();
    assert_eq!(euler.timesteps()[0], 999.0); // Euler's own default: linspace
                                             // Options we do not implement are named.
    let c = SchedulerConfig::parse(p, r#"{"algorithm_type": "sde-dpmsolver++"}"#).unwrap();
    let e = SchedulerKind::DpmPp2m
        .build(&c, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("algorithm_type") && e.contains("sde-dpmsolver++"),
        "{e}"
    );
    let c = SchedulerConfig::parse(p, r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    assert!(SchedulerKind::Ddim
        .build(&c, 4)
        .err()
        .unwrap()
        .to_string()
        .contains("beta_schedule"));
    assert!(SchedulerKind::Ddim
        .build(&SchedulerConfig::parse(p, "{}").unwrap(), 0)
        .is_err());
    assert!(SchedulerKind::Ddim
        .build(&SchedulerConfig::parse(p, "{}").unwrap(), 1001)
        .is_err());
}

/// A `lambda_min_clipped` that clips the whole schedule is refused by name (it used to
/// underflow), and a model scheduler we do not have falls back to DDIM with a warning naming it.
#[test]
fn bad_scheduler_configs_are_named() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": 100.0,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#;
    let c = SchedulerConfig::parse(Path::new("scheduler_config.json"), text).unwrap();
    let e = SchedulerKind::DpmPp2m
        .build(&c, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lambda_min_clipped") && e.contains("scheduler_config.json"),
        "{e}"
    );
    let Some(dir) = fixture("tiny-sd-2block") else {
        return;
    };
    let mut sd =
        models::StableDiffusion::load(dir.to_str().unwrap(), &models::LoadOptions::default())
            .unwrap();
    sd.scheduler_config.1 = r#"{"_class_name": "LCMScheduler"}"#.into();
    let (kind, warning) = sample::Pipeline::new(&sd).unwrap().default_scheduler();
    assert_eq!(kind, SchedulerKind::Ddim);
    let w = warning.unwrap();
    assert!(
        w.contains("LCMScheduler") && w.contains("--scheduler"),
        "{w}"
    );
}
