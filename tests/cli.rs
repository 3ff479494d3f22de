//! The command line as scripts use it: generate, logits (and its file layout), check.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a");

#[test]
fn generate_streams_text_and_prints_one_stats_line() {
    let run = |seed: &str| {
        let o = bm()
            .args([
                "generate",
                "--model",
                FIXTURE,
                "--prompt",
                "a b c",
                "--max-tokens",
                "12",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
    };
    let (a, err) = run("7");
    let (b, _) = run("7");
    let (c, _) = run("8");
    assert_eq!(a, b, "same seed, same text");
    assert_ne!(a, c, "another seed, other text");
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with("prompt tokens:")).collect();
    assert_eq!(stats.len(), 1, "{err}");
    assert!(
        stats[0].contains("prefill:") && stats[0].contains("decode:") && stats[0].contains("tok/s"),
        "{}",
        stats[0]
    );
}

#[test]
fn logits_writes_the_documented_tensors_and_check_agrees_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let o = bm()
        .args(["logits", "--model", FIXTURE, "--ids", "5,6,7,8,9", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["logits"].dims(), &[5, 512]);
    assert_eq!(t["experts"].dims(), &[2, 5]);
    assert_eq!(t["router_probs"].dims(), &[2, 5, 8]);
    assert_eq!(t["ids"].to_vec1::<i64>().unwrap(), vec![5, 6, 7, 8, 9]);
    let stepped = dir.path().join("s.safetensors");
    assert!(bm()
        .args(["logits", "--model", FIXTURE, "--ids", "5,6,7,8,9", "--step", "--out"])
        .arg(&stepped)
        .status()
        .unwrap()
        .success());
    let s = candle_core::safetensors::load(&stepped, &candle_core::Device::Cpu).unwrap();
    let d = (&s["logits"] - &t["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "--step differs by {d}");

    let o = bm().args(["check", "--model", FIXTURE, "--reference"]).arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("top-1 agreement 5/5") && text.contains("0 NaN/inf"), "{text}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let o = bm()
        .args(["generate", "--model", "/no/such/dir", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/dir"), "{err}");
    let o = bm()
        .args(["generate", "--model", FIXTURE, "--prompt", "x", "--top-p", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("top-p = 0 is out of range"));
    let o = bm()
        .args(["logits", "--model", FIXTURE, "--ids", "1,999", "--out", "/tmp/never.safetensors"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("999") && err.contains("512"), "{err}");
}
