//! SDXL end to end on the tiny-sdxl-shape fixture: `train` writes a delta that `inspect`
//! describes and `sample --delta` uses; a delta of one family is refused on the other.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use atoms::Delta;
use sample::png_io::read_png;

fn fixture(name: &str) -> Option<PathBuf> {
    testutil::shared_path(&format!("fixtures/{name}"))
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

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Trains `steps` steps of `atoms` on `model` from 3 photos at 64x64 (with prior preservation
/// when `prior`), into `out`.
fn train(model: &Path, images: &Path, out: &Path, steps: &str, prior: bool) -> Output {
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--class",
        "dog",
        "--out",
        out.to_str().unwrap(),
        "--resolution",
        "64",
        "--max-steps",
        steps,
        "--quiet",
    ];
    let class_dir = out.with_extension("class");
    if prior {
        args.extend([
            "--class-images",
            class_dir.to_str().unwrap(),
            "--num-class-images",
            "2",
            "--class-sample-steps",
            "2",
        ]);
    }
    atomtune(&args)
}

fn sample(model: &Path, out: &Path, delta: Option<&Path>) -> Output {
    let mut args = vec![
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "3",
        "--seed",
        "1",
        "--width",
        "64",
        "--height",
        "96",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(d) = delta {
        args.extend(["--delta", d.to_str().unwrap()]);
    }
    atomtune(&args)
}

fn only_png(dir: &Path) -> PathBuf {
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(pngs.len(), 1, "{pngs:?}");
    pngs.remove(0)
}

#[test]
fn sdxl_trains_a_delta_that_inspect_describes_and_sample_uses() {
    let Some(fx) = fixture("tiny-sdxl-shape") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 3).is_none() {
        return;
    }
    let out = tmp.path().join("run");
    ok(&train(&fx, &images, &out, "4", true));
    let delta = out.join("delta.safetensors");
    let d = Delta::read(&delta).unwrap();
    assert_eq!(d.meta().base_architecture.as_deref(), Some("sdxl"));
    assert_eq!(d.meta().steps, Some(4));
    assert!(d.num_params() > 0);

    let text = ok(&atomtune(&[
        "inspect",
        delta.to_str().unwrap(),
        "--base",
        fx.to_str().unwrap(),
    ]));
    assert!(text.contains("SDXL"), "{text}");
    assert!(text.contains("fits base    yes"), "{text}");

    // Sampling at 64x96 (time ids follow the size) with and without the delta.
    let (plain, tuned) = (tmp.path().join("plain"), tmp.path().join("tuned"));
    ok(&sample(&fx, &plain, None));
    ok(&sample(&fx, &tuned, Some(&delta)));
    let (a, b) = (
        read_png(&only_png(&plain)).unwrap(),
        read_png(&only_png(&tuned)).unwrap(),
    );
    assert_eq!((a.width, a.height), (64, 96));
    assert_ne!(a.pixels, b.pixels, "the delta changed nothing");
    let info = b.parameters.unwrap_or_default();
    assert!(info.contains("Deltas: "), "{info}");
}

#[test]
fn a_delta_of_one_family_is_refused_on_the_other() {
    let (Some(xl), Some(sd15)) = (fixture("tiny-sdxl-shape"), fixture("tiny-sd15-shape")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    if photos(&images, 3).is_none() {
        return;
    }
    for (train_on, apply_to, want) in [(&sd15, &xl, ("sd1", "sdxl")), (&xl, &sd15, ("sdxl", "sd1"))]
    {
        let out = tmp.path().join(format!("run-{}", want.0));
        ok(&train(train_on, &images, &out, "1", false));
        let delta = out.join("delta.safetensors");
        let o = sample(
            apply_to,
            &tmp.path().join(format!("s-{}", want.0)),
            Some(&delta),
        );
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        let (mine, theirs) = (
            format!("an {} model", want.0),
            format!("an {} model", want.1),
        );
        assert!(e.contains(&mine) && e.contains(&theirs), "{e}");
        assert!(e.contains(apply_to.to_str().unwrap()), "{e}");
    }
}
