#![allow(clippy::unwrap_used)]
//! `blackmamba finetune` stopped by a real signal while it trains: it saves a checkpoint that
//! `--resume` continues, and exits with 128 + the signal's number (SIGTERM is what `timeout`,
//! `docker stop` and job schedulers send). Also: the exit codes are in the top-level `--help`.

mod ft_common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::DType;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn steps_in(dir: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap();
    v["step"].as_u64().unwrap()
}

/// Starts a long run (`dpo`: `--method dpo` on preference pairs), waits for its progress line at
/// step 250, sends `sig`; returns the exit code, stderr, the output folder and the common arguments.
fn interrupted_run(dir: &Path, sig: &str, dpo: bool) -> (Option<i32>, String, String, Vec<String>) {
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let base = dir.join("base");
    ft_common::model(&cfg, 1, true).save_dir(&base, DType::F32).unwrap();
    ft_common::byte_tokenizer().save(base.join("tokenizer.json"), false).unwrap();
    let data = if dpo {
        let prefs = [
            ("Hi", "Hello.", "Log."),
            ("Who sat?", "The cat.", "A bird."),
            ("Sing?", "La la.", "No."),
        ]
        .map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string() + "\n")
        .concat();
        ft_common::write(dir, "prefs.jsonl", &prefs)
    } else {
        ft_common::write(dir, "chat.jsonl", &ft_common::chat_jsonl())
    };
    let out = s(&dir.join("ad"));
    let method = if dpo { "dpo" } else { "lora" };
    let common: Vec<String> = [
        "--method",
        method,
        "--model",
        &s(&base),
        "--data",
        &s(&data),
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--rank",
        "4",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    // 5000 steps: progress every 250 (stderr is not a terminal), far more than the test waits for
    let mut child = bin()
        .arg("finetune")
        .args(&common)
        .args(["--out", &out, "--steps", "5000", "--eval-fraction", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut err = String::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(300)).expect("a progress line");
        err += &line;
        err.push('\n');
        if line.starts_with("step 250/5000") {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        err += &line;
        err.push('\n');
    }
    (status.code(), err, out, common)
}

#[test]
fn sigterm_saves_a_resumable_checkpoint_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err, out, common) = interrupted_run(dir.path(), "TERM", false);
    assert_sigterm_resumes(code, &err, &out, &common);
}

#[test]
fn a_dpo_run_stops_on_sigterm_and_resumes_like_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err, out, common) = interrupted_run(dir.path(), "TERM", true);
    assert!(err.contains("rewards"), "{err}");
    assert_sigterm_resumes(code, &err, &out, &common);
}

fn assert_sigterm_resumes(code: Option<i32>, err: &str, out: &str, common: &[String]) {
    assert_eq!(code, Some(143), "{err}");
    assert!(err.contains("blackmamba: stopped by SIGTERM"), "{err}");
    let done = steps_in(Path::new(out));
    assert!((250..5000).contains(&done), "{done}");
    assert!(
        err.contains(&format!(
            "SIGTERM at step {done}: checkpoint saved to {out}; continue with --resume {out}"
        )),
        "{err}"
    );
    // no half-written files left behind
    for f in std::fs::read_dir(out).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "{name}");
    }
    let more = (done + 2).to_string();
    let o = bin()
        .arg("finetune")
        .args(common)
        .args(["--resume", out, "--steps", &more])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains(&format!("resuming at step {done}")), "{e}");
    assert_eq!(steps_in(Path::new(out)), done + 2);
}

#[test]
fn sigint_saves_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err, out, _) = interrupted_run(dir.path(), "INT", false);
    assert_eq!(code, Some(130), "{err}");
    let done = steps_in(Path::new(&out));
    assert!(err.contains(&format!("SIGINT at step {done}: checkpoint saved")), "{err}");
}

#[test]
fn help_lists_the_exit_codes() {
    let o = bin().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for line in [
        "0    success",
        "1    error",
        "2    bad command line",
        "129  SIGHUP",
        "130  SIGINT",
        "143  SIGTERM",
    ] {
        assert!(help.contains(line), "{line}: {help}");
    }
    // a usage error is 2 (clap's convention), a failing command 1
    assert_eq!(bin().arg("--no-such-flag").output().unwrap().status.code(), Some(2));
    let o = bin().args(["chat", "--system-file", "/no/such/prompt.txt"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--system-file /no/such/prompt.txt") && err.lines().count() == 1,
        "{err}"
    );
}
