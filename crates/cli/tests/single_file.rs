//! A single-file checkpoint (A1111 / ComfyUI layout) works wherever a model does: it samples
//! the same image as its diffusers folder, and trains.

mod common;

use std::path::{Path, PathBuf};

use sample::png_io::read_png;

use common::atomtune;

fn sample(model: &[&str], out: &Path) -> PathBuf {
    let mut args = vec!["sample"];
    args.extend_from_slice(model);
    args.extend([
        "--prompt",
        "a photo of sks dog",
        "--steps",
        "3",
        "--seed",
        "5",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let o = atomtune(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pngs.len(), 1);
    pngs.remove(0)
}

#[test]
fn the_single_file_samples_its_folders_image_and_trains() {
    let (Some(file), Some(dir), Some(photos)) = (
        testutil::shared_path("fixtures/single-file/tiny-sd15-shape.safetensors"),
        testutil::shared_path("fixtures/tiny-sd15-shape"),
        testutil::shared_path("datasets/dreambooth/dog"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (f, d) = (file.to_str().unwrap(), dir.to_str().unwrap());
    let a = sample(&["--model", f, "--model-config", d], &tmp.path().join("a"));
    let b = sample(&["--model", d], &tmp.path().join("b"));
    assert_eq!(read_png(&a).unwrap().pixels, read_png(&b).unwrap().pixels);
    let images = tmp.path().join("photos");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos.join("00.jpg"), images.join("00.jpg")).unwrap();
    let out = tmp.path().join("run");
    let o = atomtune(&[
        "train",
        "--model",
        f,
        "--model-config",
        d,
        "--images",
        images.to_str().unwrap(),
        "--class",
        "dog",
        "--out",
        out.to_str().unwrap(),
        "--resolution",
        "64",
        "--max-steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("delta.safetensors").is_file());
}
