//! What the CLI test binaries share: running the binary, and a tiny fixture with one photo
//! trained on.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The binary with `args`, as the tests run it: `--dtype auto` kept to f32 products
/// (`ATOMTUNE_CPU_BF16=0`), so that outputs compare with diffusers' f32 references on any CPU
/// (bf16's mixed precision has tests of its own).
pub fn command<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atomtune"));
    c.args(args).env("ATOMTUNE_CPU_BF16", "0");
    c
}

/// Whether this CPU has AVX512-BF16, by the kernel's list of flags (not by the code under
/// test); false where there is no `/proc/cpuinfo`.
pub fn cpu_has_avx512_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" avx512_bf16"))
}

/// Runs the binary with `args` ([`command`]) to its end.
pub fn atomtune(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A temporary folder with `photos/00.jpg` (a DreamBooth dog photo), and the tiny-sd15-shape
/// fixture; `None` without `../shared`.
pub fn tiny_fixture() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    let fx = testutil::shared_path("fixtures/tiny-sd15-shape")?;
    let photos = testutil::shared_path("datasets/dreambooth/dog")?;
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos.join("00.jpg"), images.join("00.jpg")).unwrap();
    Some((tmp, fx))
}

/// `atomtune train` on `tmp/photos` at 64x64 into `tmp/run` with `extra` flags; the delta.
pub fn train(tmp: &tempfile::TempDir, model: &str, extra: &[&str]) -> std::path::PathBuf {
    let (images, run) = (tmp.path().join("photos"), tmp.path().join("run"));
    let mut args = vec![
        "train",
        "--model",
        model,
        "--images",
        images.to_str().unwrap(),
        "--class",
        "dog",
        "--out",
        run.to_str().unwrap(),
        "--resolution",
        "64",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&atomtune(&args));
    run.join("delta.safetensors")
}
