//! `atomtune eval` end to end with the tiny evaluation models: prompts read from the PNGs that
//! `atomtune sample` writes (trigger dropped) or from a file, a table, and the JSON.

mod common;

use std::path::PathBuf;

fn shared(rel: &str) -> Option<PathBuf> {
    testutil::shared_path(rel)
}

use common::atomtune;

#[test]
fn eval_scores_sampled_pngs_against_photos_and_writes_json() {
    let (Some(sd), Some(ev), Some(photos)) = (
        shared("fixtures/tiny-sd15-shape"),
        shared("fixtures/eval-tiny"),
        shared("datasets/dreambooth/dog2"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gen = tmp.path().join("gen");
    let o = atomtune(&[
        "sample",
        "--model",
        sd.to_str().unwrap(),
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--num-images",
        "2",
        "--grid",
        "--quiet",
        "--out",
        gen.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = tmp.path().join("scores.json");
    let dino = ev.join("dino-vits-tiny");
    let clip = ev.join("clip-vit-tiny");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--images",
            gen.to_str().unwrap(),
            "--reference",
            photos.to_str().unwrap(),
            "--dino",
            dino.to_str().unwrap(),
            "--clip",
            clip.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = args(&["--json", json.to_str().unwrap()]);
    let o = atomtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("DINO") && out.contains("CLIP-T") && out.contains("mean"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per = v["per_image"].as_array().unwrap();
    assert_eq!(per.len(), 2, "the grid is not an image to score: {v}");
    assert_eq!(per[0]["prompt"], "a photo of dog");
    for key in ["dino", "clip_i", "clip_t"] {
        let mean = per.iter().map(|p| p[key].as_f64().unwrap()).sum::<f64>() / 2.0;
        let got = v[key].as_f64().unwrap();
        assert!(
            (got - mean).abs() < 1e-9 && got.abs() <= 1.0,
            "{key}: {got} vs {mean}"
        );
    }
    // prompts from a file: one per image, or an error naming the file
    let file = tmp.path().join("prompts.txt");
    std::fs::write(&file, "a photo of a dog\n").unwrap();
    let a = args(&["--prompts", file.to_str().unwrap()]);
    let o = atomtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("prompts.txt") && e.contains("1 prompts for 2"),
        "{e}"
    );
    std::fs::write(&file, "a photo of a dog\na dog\n").unwrap();
    let o = atomtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
