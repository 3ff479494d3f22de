//! `blackmamba finetune --method dpo` end to end on the embedded model and the shipped demo
//! preference pairs: the rewards on the progress lines and in metrics.jsonl, the loss falls and
//! the accuracy rises over a few epochs of a small slice; and the one-line errors.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use blackmamba::finetune::metrics;

fn bm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blackmamba")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/prefs/demo.jsonl");

#[test]
fn the_demo_set_is_small_and_every_line_is_a_pair() {
    let text = std::fs::read_to_string(DEMO).unwrap();
    assert!(text.len() < 200_000, "{} bytes", text.len());
    let tok = tokenizers::Tokenizer::from_bytes(blackmamba::embedded::TOKENIZER_JSON).unwrap();
    let set = blackmamba::finetune::prefs::load(Path::new(DEMO), &tok, 256).unwrap();
    assert_eq!(set.pairs.len(), text.lines().count());
    assert!(set.pairs.iter().all(|p| p.chosen != p.rejected));
}

#[test]
fn dpo_on_the_embedded_model_lowers_the_loss_and_raises_the_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    // 8 pairs, 4 a step: every 2 steps are one epoch over the same pairs
    let text: String = std::fs::read_to_string(DEMO)
        .unwrap()
        .lines()
        .take(8)
        .map(|l| format!("{l}\n"))
        .collect();
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("out");
    let (d, o) = (data.display().to_string(), out.display().to_string());
    let args = [
        "finetune",
        "--method",
        "dpo",
        "--data",
        &d,
        "--out",
        &o,
        "--steps",
        "4",
        "--batch",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "3e-3",
        "--warmup",
        "0",
        "--eval-fraction",
        "0",
        "--beta",
        "0.1",
        "--rank",
        "8",
    ];
    let (ok, err) = bm(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("dpo on embedded") && err.contains("8 training and 0 held-out pairs"),
        "{err}"
    );
    assert!(err.contains("rewards") && err.contains("margin") && err.contains("acc"), "{err}");
    assert!(out.join("adapter.safetensors").is_file() && out.join("trainer_state.json").is_file());
    let lines = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.len(), 4);
    let epoch = |k: usize, f: fn(&metrics::MetricsLine) -> f64| (f(&lines[2 * k]) + f(&lines[2 * k + 1])) / 2.0;
    let loss = |l: &metrics::MetricsLine| l.loss.unwrap();
    let acc = |l: &metrics::MetricsLine| l.reward_accuracy.unwrap();
    assert_eq!(lines[0].reward_margin, Some(0.0), "step 0: the adapters add nothing yet");
    assert!(
        epoch(1, loss) < epoch(0, loss) - 0.01,
        "loss {} -> {}",
        epoch(0, loss),
        epoch(1, loss)
    );
    assert!(epoch(1, acc) > epoch(0, acc), "accuracy {} -> {}", epoch(0, acc), epoch(1, acc));
    assert!(lines[3].reward_margin.unwrap() > 0.0);
    // the routing comparison beside the checkpoint: the embedded model's 4 MoE layers of 8 experts
    let shift: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("routing_shift.json")).unwrap()).unwrap();
    let layers = shift["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        let sum: f64 = l["after"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
        assert!(l["before"].as_array().unwrap().len() == 8 && (sum - 1.0).abs() < 1e-9, "{l}");
    }
    assert!(
        err.contains("routing before vs after on") && err.contains("the first 8 training examples"),
        "{err}"
    );
}

#[test]
fn dpo_options_and_bad_lines_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    let (d, o) = (data.display().to_string(), dir.path().join("o").display().to_string());
    let (ok, err) = bm(&["finetune", "--method", "dpo", "--data", &d, "--out", &o, "--steps", "1"]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("prefs.jsonl") && last.contains("line 2") && last.contains("\"rejected\""),
        "{err}"
    );
    for (args, want) in [
        (
            vec!["--method", "lora", "--beta", "0.2"],
            "--beta and --dpo-loss: only with --method dpo",
        ),
        (vec!["--method", "dpo", "--dpo-loss", "kto"], "--dpo-loss kto: use sigmoid"),
        (vec!["--method", "dpo-mixed"], "--method dpo-mixed: use lora, router, full, dpo"),
        (vec!["--method", "dpo", "--beta", "0"], "--beta: must be a positive number"),
    ] {
        let (ok, err) = bm(&[&["finetune", "--data", &d, "--out", &o, "--steps", "1"][..], &args[..]].concat());
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}
