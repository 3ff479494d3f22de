//! The fine-tuning commands end to end through the binary: finetune (+ resume), eval, merge,
//! generate/logits with --adapter, train, and their one-line errors.

#![allow(clippy::unwrap_used)]

mod ft_common;

use std::path::Path;
use std::process::Command;

use candle_core::DType;

fn bm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blackmamba")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A tiny model folder with the byte tokenizer.
fn model_dir(dir: &Path) -> String {
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let m = ft_common::model(&cfg, 1, true);
    let d = dir.join("base");
    m.save_dir(&d, DType::F32).unwrap();
    ft_common::byte_tokenizer().save(d.join("tokenizer.json"), false).unwrap();
    d.display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn finetune_eval_merge_generate() {
    let dir = tempfile::tempdir().unwrap();
    let base = model_dir(dir.path());
    let data = s(&ft_common::write(dir.path(), "chat.jsonl", &(ft_common::chat_jsonl() + "{oops\n")));
    let out = s(&dir.path().join("ad"));
    let common = [
        "--model",
        &base,
        "--data",
        &data,
        "--seq-len",
        "48",
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--rank",
        "4",
    ];
    let (ok, _, err) = bm(&[&["finetune"], &common[..], &["--out", &out, "--steps", "3"]].concat());
    assert!(ok, "{err}");
    assert!(err.contains("line 13: not valid JSON"), "{err}");
    assert!(err.contains("eval before") && err.contains("eval after"), "{err}");
    assert!(Path::new(&out).join("adapter.safetensors").is_file());

    // resume to 5 steps
    let (ok, _, err) = bm(&[&["finetune"], &common[..], &["--resume", &out, "--steps", "5"]].concat());
    assert!(ok && err.contains("resuming at step 3"), "{err}");
    assert_eq!(ft_common_steps(&out), 5);
    // a resume takes the run's own settings (seq-len, batch, lr, rank) and, without --model, the
    // base model recorded in the run: only --steps changes
    let (ok, _, err) = bm(&["finetune", "--data", &data, "--resume", &out, "--steps", "6"]);
    assert!(ok && err.contains("resuming at step 5"), "{err}");
    assert!(err.contains(&format!("resuming on {base} (the base model recorded in")), "{err}");
    assert!(err.contains("sequences of ≤48 tokens"), "{err}");
    assert_eq!(ft_common_steps(&out), 6);

    // eval: base vs base + adapter vs merged
    let eval = |extra: &[&str]| {
        let (ok, so, err) = bm(&[&["eval", "--data", &data, "--seq-len", "48"], extra].concat());
        assert!(ok, "{err}");
        so.split("loss ").nth(1).unwrap().split(' ').next().unwrap().parse::<f64>().unwrap()
    };
    let plain = eval(&["--model", &base]);
    let adapted = eval(&["--model", &base, "--adapter", &out]);
    assert!(adapted < plain, "{adapted} vs {plain}");
    let merged = s(&dir.path().join("merged"));
    let (ok, _, err) = bm(&["merge", "--model", &base, "--adapter", &out, "--out", &merged]);
    assert!(ok, "{err}");
    assert!((eval(&["--model", &merged]) - adapted).abs() < 1e-4);

    let (ok, _, err) = bm(&[
        "generate",
        "--model",
        &base,
        "--adapter",
        &out,
        "--prompt",
        "Hi",
        "--max-tokens",
        "3",
    ]);
    assert!(ok, "{err}");
    let lg = s(&dir.path().join("l.safetensors"));
    let (ok, _, err) = bm(&["logits", "--model", &base, "--adapter", &out, "--ids", "1,2,3", "--out", &lg]);
    assert!(ok, "{err}");
}

fn ft_common_steps(out: &str) -> usize {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(out).join("trainer_state.json")).unwrap()).unwrap();
    v["step"].as_u64().unwrap() as usize
}

#[test]
fn train_from_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ft_common::config(&["r", "4"], 16);
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, cfg.to_json_string().unwrap()).unwrap();
    let tok = dir.path().join("tok.json");
    ft_common::byte_tokenizer().save(&tok, false).unwrap();
    let data = s(&ft_common::write(dir.path(), "t.txt", &ft_common::TEXT.repeat(3)));
    let out = s(&dir.path().join("m"));
    let (ok, _, err) = bm(&[
        "train",
        "--config",
        &s(&cfg_path),
        "--data",
        &data,
        "--out",
        &out,
        "--tokenizer",
        &s(&tok),
        "--steps",
        "4",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--eval-every",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("step 2: eval loss"), "{err}");
    // the output is a model folder
    let (ok, _, err) = bm(&["generate", "--model", &out, "--prompt", "The", "--max-tokens", "3"]);
    assert!(ok, "{err}");
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = model_dir(dir.path());
    let data = s(&ft_common::write(dir.path(), "t.txt", ft_common::TEXT));
    let out = s(&dir.path().join("o"));
    for (args, want) in [
        (vec!["finetune", "--model", &base, "--data", &data], "--out"),
        (
            vec!["finetune", "--model", &base, "--data", &data, "--out", &out, "--method", "magic"],
            "--method magic",
        ),
        (
            vec![
                "finetune",
                "--model",
                &base,
                "--data",
                &data,
                "--out",
                &out,
                "--targets",
                "in_proj,foo",
            ],
            "unknown target 'foo'",
        ),
        (
            vec!["finetune", "--model", &base, "--data", &data, "--out", &out, "--steps", "0"],
            "--steps",
        ),
        (
            vec!["finetune", "--model", &base, "--data", "/nonexistent.txt", "--out", &out],
            "/nonexistent.txt",
        ),
        (
            vec!["finetune", "--model", &base, "--data", &data, "--resume", &base],
            "trainer_state.json",
        ),
        (vec!["merge", "--model", &base, "--out", &out, "--save-dtype", "f8"], "f8"),
        (vec!["eval", "--model", &base, "--data", &data, "--adapter", &base], "adapter.json"),
    ] {
        let (ok, _, err) = bm(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
