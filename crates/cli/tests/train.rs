//! `atomtune train` end to end on the tiny-sd15-shape fixture with real photos.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atoms::Delta;
use sample::png_io::read_png;

fn fixture() -> Option<PathBuf> {
    testutil::shared_path("fixtures/tiny-sd15-shape")
}

fn photos(dir: &Path, n: usize) -> Option<()> {
    let src = testutil::shared_path("datasets/dreambooth/dog")?;
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let name = format!("{i:02}.jpg");
        std::fs::copy(src.join(&name), dir.join(&name)).unwrap();
    }
    Some(())
}

use common::atomtune;

fn train_args<'a>(fx: &'a str, images: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        fx,
        "--images",
        images,
        "--class",
        "dog",
        "--out",
        out,
        "--resolution",
        "64",
        "--max-steps",
        steps,
        "--quiet",
    ]
}

#[test]
fn training_writes_a_small_delta_that_sample_can_use() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 3).is_none() {
        return;
    }
    let out = tmp.path().join("run");
    let o = atomtune(&train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "8",
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("atomtune sample --model") && stdout.contains("delta.safetensors"),
        "{stdout}"
    );
    for f in ["delta.safetensors", "metrics.jsonl", "loss.png"] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // the printed hint runs as it is in a shell (with small-image flags added)
    let hint = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("atomtune "))
        .unwrap();
    let hinted = tmp.path().join("hinted");
    let line = format!(
        "'{}' {hint} --steps 1 --width 64 --height 64 --quiet --out '{}'",
        env!("CARGO_BIN_EXE_atomtune"),
        hinted.display()
    );
    let o = Command::new("sh")
        .args(["-c", &line])
        .env("ATOMTUNE_CPU_BF16", "0")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_dir(&hinted).unwrap().count(), 1);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    // the run's options, then one line per step
    assert_eq!(metrics.lines().count(), 1 + 8);
    let run: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(run["run"]["method"], "atoms");
    assert_eq!(run["run"]["max_steps"], 8);
    let delta_path = out.join("delta.safetensors");
    let d = Delta::read(&delta_path).unwrap();
    assert_eq!(d.meta().steps, Some(8));
    assert_eq!(d.meta().trigger.as_deref(), Some("sks"));
    assert_eq!(d.meta().class.as_deref(), Some("dog"));
    assert_eq!(d.meta().base_model, fx.to_str().unwrap());
    // atoms on every conv of tiny-sd15-shape: 52 3x3 + 45 1x1 = 4,257 numbers
    assert_eq!(d.num_params(), 4257);
    let size = std::fs::metadata(&delta_path).unwrap().len();
    eprintln!("delta size: {size} bytes");
    assert!(size < 80_000, "{size} bytes");
    // the trained delta changes the image; at weight 0 it does not
    let png = |name: &str, delta: Option<String>| -> Vec<u8> {
        let dir = tmp.path().join(name);
        let mut args: Vec<String> = [
            "sample",
            "--model",
            fx.to_str().unwrap(),
            "--prompt",
            "a photo of sks dog",
            "--steps",
            "3",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet",
            "--out",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(d) = delta {
            args.push("--delta".into());
            args.push(d);
        }
        let o = common::command(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let f = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        read_png(&f).unwrap().pixels
    };
    let base = png("base", None);
    assert_ne!(png("tuned", Some(delta_path.display().to_string())), base);
    assert_eq!(
        png("zero", Some(format!("{}:0", delta_path.display()))),
        base
    );
}

#[test]
fn ctrl_c_leaves_a_checkpoint_and_a_delta_and_the_run_resumes() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 2).is_none() {
        return;
    }
    let out = tmp.path().join("run");
    let args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "100000",
    );
    let child = common::command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for a few steps
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("--resume latest"), "{stdout}");
    let ck = train::checkpoint::latest(&out.join("checkpoints")).expect("a checkpoint");
    let ck = train::checkpoint::read(&ck).unwrap();
    let d = Delta::read(&out.join("delta.safetensors")).unwrap();
    assert_eq!(d.meta().steps, Some(ck.state.step as u64));
    // the run record, then a line per step
    assert_eq!(
        std::fs::read_to_string(&metrics).unwrap().lines().count(),
        1 + ck.state.step
    );
    // resume and finish a few more steps
    let target = (ck.state.step + 2).to_string();
    let mut args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        &target,
    );
    args.extend(["--resume", "latest"]);
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        Delta::read(&out.join("delta.safetensors"))
            .unwrap()
            .meta()
            .steps,
        Some(ck.state.step as u64 + 2)
    );
}

#[test]
fn a_corrupt_image_is_named_or_skipped() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 2).is_none() {
        return;
    }
    std::fs::copy(
        testutil::data_path("images/corrupt.jpg"),
        images.join("broken.jpg"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "1",
    );
    let o = atomtune(&args);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("broken.jpg") && e.contains("--skip-bad-images"),
        "{e}"
    );
    let mut args = args.clone();
    args.push("--skip-bad-images");
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: skipping"));
    // an empty folder is an error too
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = atomtune(&train_args(
        fx.to_str().unwrap(),
        empty.to_str().unwrap(),
        out.to_str().unwrap(),
        "1",
    ));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no images found"));
}

/// A validation option without `--validation-prompt` is refused, before the model loads, naming
/// both flags (it was silently ignored).
#[test]
fn validation_options_need_a_validation_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for flag in [
        "--validation-every",
        "--validation-steps",
        "--num-validation-images",
    ] {
        let mut args = train_args(
            "no-such-model",
            images.to_str().unwrap(),
            tmp.path().to_str().unwrap(),
            "1",
        );
        args.extend([flag, "2"]);
        let o = atomtune(&args);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(flag) && e.contains("--validation-prompt"), "{e}");
    }
}

/// `--gradient-checkpointing` (selective) and `--gradient-checkpointing=all` train the same run:
/// the same losses step by step (to float rounding; the recomputed blocks sum some gradients in
/// another order); an unknown mode is refused with the ones there are.
#[test]
fn gradient_checkpointing_trains_the_same_run() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 2).is_none() {
        return;
    }
    let losses = |name: &str, extra: &[&str]| -> Vec<f64> {
        let out = tmp.path().join(name);
        let mut args = train_args(
            fx.to_str().unwrap(),
            images.to_str().unwrap(),
            out.to_str().unwrap(),
            "4",
        );
        args.extend_from_slice(extra);
        let o = atomtune(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().expect("a loss on every line")
            })
            .collect()
    };
    let plain = losses("plain", &[]);
    assert_eq!(plain.len(), 4);
    // the flag alone is the selective mode
    for (name, flag) in [
        ("selective", "--gradient-checkpointing"),
        ("all", "--gradient-checkpointing=all"),
    ] {
        let ckpt = losses(name, &[flag]);
        assert_eq!(
            plain[0], ckpt[0],
            "{flag}: the first step's loss is the same forward"
        );
        for (a, b) in plain.iter().zip(&ckpt) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "{flag}: {plain:?} vs {ckpt:?}"
            );
        }
    }
    let out = tmp.path().join("bad");
    let mut args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "1",
    );
    args.push("--gradient-checkpointing=most");
    let o = atomtune(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("selective") && err.contains("all"),
        "{err}"
    );
}

/// What a delta does to every weight of the fixture's UNet, `W' - W`, in f32, layers in order.
fn weight_changes(fx: &Path, delta: &Path) -> Vec<f32> {
    use atoms::{Adapter, BaseWeights};
    let base = atoms::SafetensorsBase::open(
        &fx.join("unet/diffusion_pytorch_model.safetensors"),
        "fixture",
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let d = Delta::read(delta).unwrap();
    d.adapters(&base)
        .unwrap()
        .iter()
        .flat_map(|(layer, a)| {
            a.delta_weight(&base.weight(layer).unwrap(), 1.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// `ATOMTUNE_KERNELS=portable` makes the CPU run the code a GPU runs; it trains the run the
/// fused CPU kernels train: the same losses and the same weight changes to f32 rounding, plain
/// and with either checkpointing mode. Any other value is refused, naming the ones it takes.
#[test]
fn portable_kernels_train_the_same_run() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 2).is_none() {
        return;
    }
    let run = |name: &str, kernels: &str, extra: &[&str]| -> (Vec<f64>, Vec<f32>) {
        let out = tmp.path().join(name);
        let mut args = train_args(
            fx.to_str().unwrap(),
            images.to_str().unwrap(),
            out.to_str().unwrap(),
            "3",
        );
        // 128 px: at 64 the fixture's lowest level is 1x1, where a group norm of a few numbers
        // makes the gradients depend on rounding
        let at = args.iter().position(|a| *a == "--resolution").unwrap();
        args[at + 1] = "128";
        args.extend_from_slice(extra);
        let o = common::command(&args)
            .env("ATOMTUNE_KERNELS", kernels)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        (losses, weight_changes(&fx, &out.join("delta.safetensors")))
    };
    let (losses, changes) = run("fused", "fused", &[]);
    for (name, extra) in [
        ("portable", &[][..]),
        ("portable-selective", &["--gradient-checkpointing"][..]),
        ("portable-all", &["--gradient-checkpointing=all"][..]),
    ] {
        let (l, c) = run(name, "portable", extra);
        for (a, b) in losses.iter().zip(&l) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "{name}: {losses:?} vs {l:?}"
            );
        }
        let (mut d, mut n) = (0f64, 0f64);
        for (a, b) in changes.iter().zip(&c) {
            d += ((a - b) as f64).powi(2);
            n += (*a as f64).powi(2);
        }
        let rel = (d / n).sqrt();
        assert!(
            n > 0.0 && rel < 1e-3,
            "{name}: weight changes differ by {rel}"
        );
    }
    let o = common::command(["inspect", "nothing.safetensors"])
        .env("ATOMTUNE_KERNELS", "gpu")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("ATOMTUNE_KERNELS")
            && err.contains("fused")
            && err.contains("portable"),
        "{err}"
    );
}

/// `--config FILE.toml`: the run's own OUT/config.toml repeats it bit for bit; flags on the
/// command line override the file; an unknown key is an error naming it.
#[test]
fn a_config_file_repeats_a_run_and_flags_override_it() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 2).is_none() {
        return;
    }
    let a = tmp.path().join("a");
    let mut args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        a.to_str().unwrap(),
        "3",
    );
    args.extend(["--min-snr-gamma", "5", "--flip", "--lr", "0.003"]);
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(
        cfg.contains("min_snr_gamma = 5") && cfg.contains("flip = true"),
        "{cfg}"
    );
    // the same run from the file, into another folder given on the command line
    let b = tmp.path().join("b");
    let o = atomtune(&[
        "train",
        "--config",
        a.join("config.toml").to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let losses = |d: &Path| -> Vec<String> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
    let bits = |d: &Path| -> Vec<Vec<u32>> {
        let delta = Delta::read(&d.join("delta.safetensors")).unwrap();
        delta
            .layers()
            .values()
            .flat_map(|t| t.values())
            .map(|x| {
                x.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect()
    };
    assert!(bits(&a) == bits(&b), "the deltas differ");
    // a flag overrides the file
    let c = tmp.path().join("c");
    let o = atomtune(&[
        "train",
        "--config",
        a.join("config.toml").to_str().unwrap(),
        "--out",
        c.to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&c).len(), 1 + 1, "the run record and one step");
    // unknown keys are named
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "max_steps = 2\nmax_step = 3\n").unwrap();
    let o = atomtune(&["train", "--config", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unknown key `max_step`") && e.contains("bad.toml"),
        "{e}"
    );
}

/// A write that fails after training started (here the delta's path is taken by a folder, as a
/// full disk would fail it) names the file, says the last checkpoint is intact and how to
/// resume, and resuming then finishes the run; an --out that cannot be a folder is named.
#[test]
fn a_failed_write_names_the_file_and_the_checkpoint_to_resume_from() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 1).is_none() {
        return;
    }
    let out = tmp.path().join("run");
    std::fs::create_dir_all(out.join("delta.safetensors")).unwrap();
    let mut args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "2",
    );
    args.extend(["--checkpoint-every", "1"]);
    let o = atomtune(&args);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("could not write")
            && e.contains("delta.safetensors")
            && e.contains("step-000002")
            && e.contains("--resume latest"),
        "{e}"
    );
    std::fs::remove_dir_all(out.join("delta.safetensors")).unwrap();
    args.extend(["--resume", "latest"]);
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("delta.safetensors").is_file());
    // an --out under a file
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let bad = file.join("run");
    let o = atomtune(&train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        bad.to_str().unwrap(),
        "1",
    ));
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(bad.to_str().unwrap()), "{e}");
}

/// `--dtype bf16` on the CPU keeps conv and linear weights in bf16, but the delta it trains
/// records the base as loaded: `inspect --base --strict` in f32 and in bf16 sees the same
/// weights.
#[test]
fn a_bf16_run_fingerprints_its_base_as_an_f32_run_does() {
    let Some(fx) = fixture() else { return };
    if !common::cpu_has_avx512_bf16() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 1).is_none() {
        return;
    }
    let out = tmp.path().join("run");
    let mut args = train_args(
        fx.to_str().unwrap(),
        images.to_str().unwrap(),
        out.to_str().unwrap(),
        "2",
    );
    args.extend(["--dtype", "bf16"]);
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let delta = out.join("delta.safetensors");
    let inspect = [
        "inspect",
        delta.to_str().unwrap(),
        "--base",
        fx.to_str().unwrap(),
        "--strict",
    ];
    for bf16 in ["0", "1"] {
        let o = common::command(inspect)
            .env("ATOMTUNE_CPU_BF16", bf16)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("(same base weights)"),
            "ATOMTUNE_CPU_BF16={bf16}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
