//! `atomtune sample` end to end on the tiny-sd15-shape fixture.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use atoms::{Adapter, AdapterConfig, Delta, DeltaMeta, LayerAdapter, Method};
use models::{LoadOptions, StableDiffusion, Targets};
use sample::png_io::read_png;
use sample::Infotext;

fn fixture() -> Option<PathBuf> {
    testutil::shared_path("fixtures/tiny-sd15-shape")
}

use common::atomtune;

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "atomtune failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "png")
                && !p.file_name().unwrap().to_string_lossy().starts_with("grid")
        })
        .collect();
    v.sort();
    v
}

fn pixels(p: &Path) -> Vec<u8> {
    read_png(p).unwrap().pixels
}

#[test]
fn pngs_carry_parameters_that_parse_back_to_the_flags() {
    let Some(fx) = fixture() else { return };
    let out = tempfile::tempdir().unwrap();
    let o = atomtune(&[
        "sample",
        "--model",
        fx.to_str().unwrap(),
        "--prompt",
        "a photo of sks dog, at the beach",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--guidance",
        "5",
        "--scheduler",
        "euler",
        "--seed",
        "11",
        "--width",
        "128",
        "--height",
        "64",
        "--out",
        out.path().to_str().unwrap(),
        "--quiet",
    ]);
    ok(&o);
    let files = pngs(out.path());
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("00000-11.png"), "{files:?}");
    let png = read_png(&files[0]).unwrap();
    assert_eq!((png.width, png.height), (128, 64));
    let info = Infotext::parse(png.parameters.as_deref().unwrap());
    assert_eq!(info.prompt, "a photo of sks dog, at the beach");
    assert_eq!(info.negative_prompt, "blurry");
    let m = info.map();
    assert_eq!(m["Steps"], "3");
    assert_eq!(m["Sampler"], "Euler");
    assert_eq!(m["Scheduler"], "euler");
    assert_eq!(m["CFG scale"], "5");
    assert_eq!(m["Seed"], "11");
    assert_eq!(m["Size"], "128x64");
    assert_eq!(m["Model"], fx.to_str().unwrap());
}

#[test]
fn any_image_of_a_run_can_be_made_again_alone() {
    let Some(fx) = fixture() else { return };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &Path, seed: &str, n: &str| {
        ok(&atomtune(&[
            "sample",
            "--model",
            fx.to_str().unwrap(),
            "--prompt",
            "a dog",
            "--steps",
            "4",
            "--scheduler",
            "euler-a",
            "--seed",
            seed,
            "--num-images",
            n,
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            dir.to_str().unwrap(),
            "--quiet",
        ]))
    };
    run(a.path(), "100", "3");
    run(b.path(), "102", "1");
    let (three, one) = (pngs(a.path()), pngs(b.path()));
    assert_eq!(three.len(), 3);
    assert!(three[2].ends_with("00002-102.png"));
    assert_eq!(pixels(&three[2]), pixels(&one[0]));
    assert_ne!(pixels(&three[0]), pixels(&three[1]));
}

/// An `atoms` delta on every conv of the fixture with random `dD` of size `scale`.
fn write_delta(fx: &Path, path: &Path, seed: u64, scale: f32) {
    let sd = StableDiffusion::load(fx.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let layers = sd.unet.layers();
    let mut adapters = Vec::new();
    for (i, name) in layers.select(Targets::Conv).into_iter().enumerate() {
        let a = LayerAdapter::new(
            &AdapterConfig::new(Method::Atoms),
            &name,
            &layers.get(&name).unwrap().weight,
        )
        .unwrap();
        let v = &a.vars()[0];
        let r = sample::NoiseRng::new(seed * 1000 + i as u64)
            .randn(v.dims(), v.dtype(), &candle_core::Device::Cpu)
            .unwrap();
        v.set(&(r * scale as f64).unwrap()).unwrap();
        adapters.push((name, a));
    }
    let mut meta = DeltaMeta::new(AdapterConfig::new(Method::Atoms), fx.display().to_string());
    meta.trigger = Some("sks".into());
    meta.class = Some("dog".into());
    Delta::from_adapters(meta, adapters.iter().map(|(n, a)| (n.as_str(), a)), layers)
        .unwrap()
        .write(path)
        .unwrap();
}

#[test]
fn deltas_change_the_image_weight_zero_does_not_and_two_stack() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (
        tmp.path().join("d1.safetensors"),
        tmp.path().join("d2.safetensors"),
    );
    write_delta(&fx, &d1, 1, 0.3);
    write_delta(&fx, &d2, 2, 0.3);
    let run = |name: &str, deltas: &[String]| -> Vec<u8> {
        let dir = tmp.path().join(name);
        let mut args: Vec<String> = [
            "sample",
            "--model",
            fx.to_str().unwrap(),
            "--prompt",
            "a photo of {token} {class}",
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet",
            "--token",
            "sks",
            "--class",
            "dog",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.to_str().unwrap().into());
        for d in deltas {
            args.push("--delta".into());
            args.push(d.clone());
        }
        let o = common::command(&args).output().unwrap();
        ok(&o);
        pixels(&pngs(&dir)[0])
    };
    let base = run("base", &[]);
    let zero = run("zero", &[format!("{}:0", d1.display())]);
    assert_eq!(
        zero, base,
        "a delta at weight 0 must give the base model's image exactly"
    );
    let one = run("one", &[d1.display().to_string()]);
    assert_ne!(one, base, "the delta changes nothing");
    let two = run(
        "two",
        &[d1.display().to_string(), format!("{}:1", d2.display())],
    );
    let only2 = run("only2", &[d2.display().to_string()]);
    assert_ne!(two, one);
    assert_ne!(two, only2);
    // Stacking is additive: d1 at 1 and d1 at -1 cancel out to the base (up to rounding).
    let cancel = run(
        "cancel",
        &[d1.display().to_string(), format!("{}:-1", d1.display())],
    );
    let max = cancel
        .iter()
        .zip(&base)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(max <= 1, "d1 - d1 differs from the base by {max}/255");
}

#[test]
fn bad_flags_get_errors_that_name_them() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "sample",
        "--model",
        fx.to_str().unwrap(),
        "--steps",
        "2",
        "--quiet",
        "--out",
        tmp.path().to_str().unwrap(),
    ];
    let err = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = atomtune(&args);
        assert!(!o.status.success(), "{extra:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["--prompt", "x", "--width", "100"]).contains("--width 100"));
    assert!(err(&["--prompt", "a photo of {token}"]).contains("{token}"));
    let e = err(&["--prompt", "x", "--delta", "missing.safetensors"]);
    assert!(e.contains("--delta missing.safetensors"), "{e}");
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "# only a comment\n\n").unwrap();
    assert!(err(&["--prompts", prompts.to_str().unwrap()]).contains("no prompts"));
    let o = atomtune(&[
        "sample",
        "--model",
        "./no-such-folder",
        "--prompt",
        "x",
        "--quiet",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--model ./no-such-folder"),
        "{e}"
    );
}

/// Seeds wrap (`seed + i` overflowed in debug builds), and validation images carry the same
/// infotext as `atomtune sample`'s.
#[test]
fn seeds_wrap_and_validation_images_carry_samples_infotext() {
    let Some(fx) = fixture() else { return };
    let Some(photos) = testutil::shared_path("datasets/dreambooth/dog") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    ok(&atomtune(&[
        "sample",
        "--model",
        fx.to_str().unwrap(),
        "--prompt",
        "a dog",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "18446744073709551615",
        "--num-images",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]));
    let seeds: Vec<String> = pngs(&out)
        .iter()
        .map(|p| {
            let info = Infotext::parse(&read_png(p).unwrap().parameters.unwrap());
            info.map()["Seed"].to_string()
        })
        .collect();
    assert_eq!(seeds, vec!["18446744073709551615", "0"]);
    let images = tmp.path().join("photos");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos.join("00.jpg"), images.join("00.jpg")).unwrap();
    let run = tmp.path().join("run");
    ok(&atomtune(&[
        "train",
        "--model",
        fx.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--class",
        "dog",
        "--out",
        run.to_str().unwrap(),
        "--resolution",
        "64",
        "--max-steps",
        "1",
        "--validation-prompt",
        "a photo of {token} dog",
        "--validation-every",
        "1",
        "--validation-steps",
        "1",
        "--quiet",
    ]));
    let v = pngs(&run.join("samples"));
    let info = Infotext::parse(&read_png(&v[0]).unwrap().parameters.unwrap());
    let m = info.map();
    for key in [
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Scheduler",
        "Training step",
        "Version",
    ] {
        assert!(m.contains_key(key), "{key} missing: {m:?}");
    }
    assert_eq!(info.prompt, "a photo of sks dog");
}

/// `--dtype auto` on the CPU runs bf16 products where the CPU has AVX512-BF16 (by
/// `/proc/cpuinfo`'s flags), unless `ATOMTUNE_CPU_BF16=0`; `--dtype f32` runs f32 anywhere.
#[test]
fn dtype_auto_runs_bf16_products_where_the_cpu_has_them() {
    let Some(fx) = fixture() else { return };
    let has_bf16 = common::cpu_has_avx512_bf16();
    let run = |dtype: &str, var: Option<&str>| -> String {
        let out = tempfile::tempdir().unwrap();
        let mut c = common::command([
            "sample",
            "--model",
            fx.to_str().unwrap(),
            "--prompt",
            "a dog",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--dtype",
            dtype,
            "--out",
            out.path().to_str().unwrap(),
        ]);
        match var {
            Some(v) => c.env("ATOMTUNE_CPU_BF16", v),
            None => c.env_remove("ATOMTUNE_CPU_BF16"),
        };
        let o = c.output().unwrap();
        ok(&o);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let products = "f32 activations, bf16 weights and matrix products)";
    let auto = run("auto", None);
    assert_eq!(auto.contains(products), has_bf16, "{auto}");
    assert!(has_bf16 || auto.contains("(f32)"), "{auto}");
    let kept = run("auto", Some("0"));
    assert!(kept.contains("(f32)"), "{kept}");
    let f32 = run("f32", Some("1"));
    assert!(f32.contains("(f32)"), "{f32}");
}
