//! Says, in the default output of `cargo test`, when the shared fixtures are missing: the tests
//! that need them pass without checking anything (each prints why, but `cargo test` captures
//! that), so a fresh clone without `../shared` must not look fully tested.

use std::path::{Path, PathBuf};

/// `#[test]`s in the workspace's test files that read `../shared` through testutil.
fn tests_needing_shared(root: &Path) -> (usize, usize) {
    let (mut tests, mut files) = (0, 0);
    let Ok(crates) = std::fs::read_dir(root.join("crates")) else {
        return (0, 0);
    };
    for c in crates.flatten() {
        let Ok(entries) = std::fs::read_dir(c.path().join("tests")) else {
            continue;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if text.contains("testutil::shared_path") || text.contains("testutil::fixture") {
                files += 1;
                tests += text.matches("#[test]").count();
            }
        }
    }
    (tests, files)
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.join("../..");
    println!("cargo:rerun-if-env-changed=ATOMTUNE_SHARED");
    let shared = match std::env::var_os("ATOMTUNE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => root.join("../shared"),
    };
    let fixtures = shared.join("fixtures");
    println!("cargo:rerun-if-changed={}", fixtures.display());
    if !fixtures.is_dir() {
        let (tests, files) = tests_needing_shared(&root);
        println!(
            "cargo:warning={} not found: about {tests} tests in {files} test files skip their checks against the diffusers fixtures (they print why under --nocapture); set ATOMTUNE_SHARED to the folder holding fixtures/ and datasets/",
            fixtures.display()
        );
    }
}
