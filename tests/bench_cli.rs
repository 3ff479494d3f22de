//! `blackmamba bench`'s user path (`--path user`: `generate` with the default sampling) on the
//! CPU, and the decode path `generate` reports.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a");

#[test]
fn bench_path_user_times_generate_with_default_sampling() {
    let o = bm()
        .args([
            "bench",
            "--model",
            FIXTURE,
            "--path",
            "user",
            "--prompt-len",
            "8",
            "--gen-len",
            "12",
            "--reps",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rep["decode"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["mode"], "user");
    // 12 tokens generated with end-of-text ignored: 11 decode steps after the first sample
    assert_eq!(row["tokens"], 11, "{row}");
    assert!(row["tok_s"].as_f64().unwrap() > 0.0, "{row}");
    let note = row["note"].as_str().unwrap();
    assert!(note.contains("default sampling") && note.contains("Model::step"), "{note}");
    // --path and --modes name the same thing twice: refused
    let o = bm()
        .args(["bench", "--model", FIXTURE, "--path", "user", "--modes", "step"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn generate_reports_its_decode_path() {
    let o = bm()
        .args(["generate", "--model", FIXTURE, "--prompt", "a b", "--max-tokens", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8(o.stderr).unwrap();
    let stats = err.lines().find(|l| l.starts_with("prompt tokens:")).unwrap();
    assert!(stats.contains("decode path: Model::step"), "{stats}");
}
