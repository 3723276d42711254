//! `atomtune export` end to end: a trained delta written as a LoCon and as a diff, with the
//! kohya / model-spec metadata UIs list, and `inspect` on the result.

use std::process::{Command, Output};

fn atomtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atomtune"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn export_writes_locon_and_diff_files_that_inspect_describes() {
    let (Some(fx), Some(photos)) = (
        testutil::shared_path("fixtures/tiny-sd15-shape"),
        testutil::shared_path("datasets/dreambooth/dog"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos.join("00.jpg"), images.join("00.jpg")).unwrap();
    let run = tmp.path().join("run");
    let f = fx.to_str().unwrap();
    ok(&atomtune(&[
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
        "2",
        "--lr",
        "0.01",
        "--quiet",
    ]));
    let delta = run.join("delta.safetensors");
    let d = delta.to_str().unwrap();
    let locon = tmp.path().join("sks-dog.safetensors");
    let out = ok(&atomtune(&[
        "export",
        "--model",
        f,
        "--delta",
        d,
        "--format",
        "locon",
        "--out",
        locon.to_str().unwrap(),
    ]));
    assert!(
        out.contains("LoCon") && out.contains("relative error overall"),
        "{out}"
    );
    let file = atoms::kohya::AdapterFile::read(&locon).unwrap();
    assert_eq!(file.modules.len(), 97, "every adapted conv");
    assert_eq!(file.metadata["ss_network_module"], "lycoris.kohya");
    assert_eq!(file.metadata["ss_base_model_version"], "sd_v1");
    assert_eq!(file.metadata["modelspec.trigger_phrase"], "sks");
    assert_eq!(file.metadata["ss_output_name"], "sks-dog");
    // every layer within the default 1% (the reported errors)
    let overall: f64 = file.metadata["atomtune.relative_error"].parse().unwrap();
    assert!(overall <= 0.01, "{overall}");
    let diff = tmp.path().join("diff.safetensors");
    ok(&atomtune(&[
        "export",
        "--model",
        f,
        "--delta",
        d,
        "--format",
        "diff",
        "--out",
        diff.to_str().unwrap(),
    ]));
    let file = atoms::kohya::AdapterFile::read(&diff).unwrap();
    assert!(file.modules.values().all(|m| m.kind() == "diff"));
    let text = ok(&atomtune(&["inspect", diff.to_str().unwrap(), "--base", f]));
    assert!(
        text.contains("kohya / LyCORIS") && text.contains("97 diff"),
        "{text}"
    );
    assert!(
        text.contains("97 of 97 modules name a UNet layer"),
        "{text}"
    );
    // not an adapter file at all
    let o = atomtune(&[
        "inspect",
        fx.join("unet/diffusion_pytorch_model.safetensors")
            .to_str()
            .unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither an atomtune delta"));
}
