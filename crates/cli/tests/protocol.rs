//! `scripts/dreambooth-protocol.sh --tiny`: the whole protocol (train, sample, eval, table) end
//! to end on the tiny fixtures, with this build's binary.

use std::process::Command;

#[test]
fn the_protocol_script_runs_end_to_end_in_tiny_mode() {
    let (Some(_), Some(_), Some(data)) = (
        testutil::shared_path("fixtures/tiny-sd15-shape"),
        testutil::shared_path("fixtures/eval-tiny"),
        testutil::shared_path("datasets/dreambooth/prompts_and_classes.txt"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("protocol");
    let script = testutil::workspace_root().join("scripts/dreambooth-protocol.sh");
    let run = || {
        Command::new("bash")
            .arg(&script)
            .args(["--tiny", "--out", out.to_str().unwrap()])
            .args(["--data", data.parent().unwrap().to_str().unwrap()])
            .env("ATOMTUNE", env!("CARGO_BIN_EXE_atomtune"))
            // f32 products whatever the CPU, as the other CLI tests (tests/common)
            .env("ATOMTUNE_CPU_BF16", "0")
            .env("ATOMTUNE_SHARED", testutil::shared_dir())
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    for want in [
        "| dog | dog | live |",
        "| backpack | backpack | object |",
        "**overall** (2 subjects)",
    ] {
        assert!(table.contains(want), "{want}:\n{table}");
    }
    // every score a number in [-1, 1]
    let row = table.lines().find(|l| l.starts_with("| dog")).unwrap();
    let nums: Vec<f64> = row
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert_eq!(nums.len(), 3, "{row}");
    assert!(nums.iter().all(|x| x.abs() <= 1.0), "{row}");
    // a second run finds every subject done and rewrites the same table
    let o = run();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("dog: done before"));
    assert_eq!(
        std::fs::read_to_string(out.join("results.md")).unwrap(),
        table
    );
}
