//! `atomtune export` end to end: a trained delta written as a LoCon and as a diff, with the
//! kohya / model-spec metadata UIs list, and `inspect` on the result.

mod common;
use common::{atomtune, ok, tiny_fixture, train};

#[test]
fn export_writes_locon_and_diff_files_that_inspect_describes() {
    let Some((tmp, fx)) = tiny_fixture() else {
        return;
    };
    let f = fx.to_str().unwrap();
    let delta = train(&tmp, f, &["--max-steps", "2", "--lr", "0.01"]);
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

/// The latents-free pixels of `atomtune sample` with `extra` flags (seed 3, 2 steps, 64x64).
fn sample_pixels(model: &str, extra: &[&str], out: &std::path::Path) -> Vec<u8> {
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--prompt",
        "a photo of <sks> dog",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
        "--out",
    ];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    ok(&atomtune(&args));
    let png = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    sample::png_io::read_png(&png).unwrap().pixels
}

/// `--train-token-embedding` end to end: `inspect` shows the learned token, `export` bundles it
/// as A1111 does (`bundle_emb.<trigger>.string_to_param.*`), and sampling with the exported
/// diff reads it back to the same image as the delta; `merge` refuses a delta it cannot hold.
#[test]
fn a_learned_token_travels_in_the_delta_and_in_the_exported_file() {
    let Some((tmp, fx)) = tiny_fixture() else {
        return;
    };
    let f = fx.to_str().unwrap();
    let delta = train(
        &tmp,
        f,
        &[
            "--token",
            "<sks>",
            "--train-token-embedding",
            "--embedding-lr",
            "0.05",
            "--max-steps",
            "3",
        ],
    );
    let d = delta.to_str().unwrap();
    let shown = ok(&atomtune(&["inspect", d]));
    assert!(
        shown.contains("embedding    a new token \"<sks>\", text_encoder [32]"),
        "{shown}"
    );
    assert!(
        shown.lines().any(|l| l.starts_with(' ')
            && l.split_whitespace().collect::<Vec<_>>() == ["train_token_embedding", "true"]),
        "{shown}"
    );
    let diff = tmp.path().join("sks.safetensors");
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
    assert_eq!(
        file.embeddings["<sks>"]["string_to_param.*"].dims(),
        &[1, 32]
    );
    let shown = ok(&atomtune(&["inspect", diff.to_str().unwrap()]));
    assert!(shown.contains("embedding    \"<sks>\" bundled"), "{shown}");
    let a = sample_pixels(f, &["--delta", d], &tmp.path().join("a"));
    let b = sample_pixels(
        f,
        &["--delta", diff.to_str().unwrap()],
        &tmp.path().join("b"),
    );
    let base = sample_pixels(f, &[], &tmp.path().join("c"));
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        worst <= 1,
        "the exported file samples {worst}/255 away from the delta"
    );
    assert_ne!(a, base, "the learned token changes the image");
    let e = atomtune(&[
        "merge",
        "--model",
        f,
        "--delta",
        d,
        "--out",
        tmp.path().join("merged").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("learned token"),
        "{err}"
    );
}
