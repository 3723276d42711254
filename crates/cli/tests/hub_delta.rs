//! `--delta owner/name[:FILE]` reads a delta from a hub repo through the Hugging Face cache,
//! offline (the hub endpoint points at a closed port).

use std::process::Output;

mod common;

fn atomtune(args: &[&str], home: &std::path::Path) -> Output {
    common::command(args)
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

#[test]
fn a_delta_from_a_cached_hub_repo_samples_like_the_local_file() {
    let (Some(fx), Some(photos)) = (
        testutil::shared_path("fixtures/tiny-sd15-shape"),
        testutil::shared_path("datasets/dreambooth/dog"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let images = tmp.path().join("photos");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos.join("00.jpg"), images.join("00.jpg")).unwrap();
    let run = tmp.path().join("run");
    let f = fx.to_str().unwrap();
    let o = atomtune(
        &[
            "train",
            "--model",
            f,
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
            "--quiet",
        ],
        &home,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.join("hub/models--someone--sks-dog");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(
        run.join("delta.safetensors"),
        snap.join("delta.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let sample = |delta: &str, out: &str| {
        atomtune(
            &[
                "sample",
                "--model",
                f,
                "--prompt",
                "a photo of sks dog",
                "--steps",
                "2",
                "--seed",
                "1",
                "--width",
                "64",
                "--height",
                "64",
                "--quiet",
                "--delta",
                delta,
                "--out",
                tmp.path().join(out).to_str().unwrap(),
            ],
            &home,
        )
    };
    let local = run.join("delta.safetensors");
    let a = sample(&format!("{}:0.5", local.display()), "a");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = sample("someone/sks-dog:delta.safetensors:0.5", "b");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let png = |d: &str| {
        let p = std::fs::read_dir(tmp.path().join(d))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        sample::png_io::read_png(&p).unwrap().pixels
    };
    assert!(png("a") == png("b"), "the hub delta samples another image");
    // offline, the repo's file must be named
    let c = sample("someone/sks-dog", "c");
    assert!(!c.status.success());
    let e = String::from_utf8_lossy(&c.stderr);
    assert!(e.contains("someone/sks-dog:FILE.safetensors"), "{e}");
}
