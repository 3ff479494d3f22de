//! The command line's conventions: --version, value enums, completions, --color, --json,
//! --prompt-file and stdin, the config file, atomic --out, and the manifest's promises.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a");

/// The binary with an empty config dir (no user's config.toml leaks in) and no NO_COLOR.
fn bm(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blackmamba"));
    c.env("XDG_CONFIG_HOME", config).env_remove("NO_COLOR");
    c
}

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn with_stdin(c: &mut Command, input: &str) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn version_names_the_commit_the_cuda_feature_and_the_archs() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_ok(bm(dir.path()).arg("--version"));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with(&format!("blackmamba {}\n", env!("CARGO_PKG_VERSION"))), "{text}");
    let commit = text.lines().find_map(|l| l.strip_prefix("commit: ")).unwrap();
    assert!(commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    let cuda = if cfg!(feature = "cuda") { "on" } else { "off" };
    assert!(text.contains(&format!("features: cuda {cuda}\n")), "{text}");
    let archs = text.lines().find_map(|l| l.strip_prefix("cuda archs: ")).unwrap();
    assert_eq!(archs.contains("sm_"), cfg!(feature = "cuda"), "{text}");
    let short = run_ok(bm(dir.path()).arg("-V"));
    assert_eq!(
        String::from_utf8(short.stdout).unwrap().trim(),
        format!("blackmamba {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn device_and_dtype_values_are_listed_and_checked_by_clap() {
    let dir = tempfile::tempdir().unwrap();
    let help = String::from_utf8(run_ok(bm(dir.path()).args(["generate", "--help"])).stdout).unwrap();
    for v in ["- cpu:", "- cuda:", "- f32:", "- bf16:", "- f16:"] {
        assert!(help.contains(v), "{v} in:\n{help}");
    }
    let o = bm(dir.path())
        .args(["generate", "--prompt", "x", "--device", "gpu"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'gpu'") && err.contains("[possible values: cpu, cuda]"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "usage errors are one line too: {err}");
    let o = bm(dir.path()).args(["check", "--dtype", "f64"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("[possible values: f32, bf16, f16]"));
}

#[test]
fn completions_cover_every_shell_and_the_new_flags() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_blackmamba()"),
        ("zsh", "#compdef blackmamba"),
        ("fish", "complete -c blackmamba"),
        ("elvish", "edit:completion:arg-completer[blackmamba]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = String::from_utf8(run_ok(bm(dir.path()).args(["completions", shell])).stdout).unwrap();
        assert!(out.contains(marker), "{shell}: {marker}");
        assert!(out.contains("prompt-file") && out.contains("completions"), "{shell}");
    }
    let o = bm(dir.path()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn color_always_never_and_no_color_govern_the_help() {
    let dir = tempfile::tempdir().unwrap();
    let help = |args: &[&str], no_color: bool| {
        let mut c = bm(dir.path());
        if no_color {
            c.env("NO_COLOR", "1");
        }
        String::from_utf8(run_ok(c.args(args)).stdout).unwrap()
    };
    assert!(help(&["--color", "always", "--help"], false).contains("\x1b["));
    assert!(
        help(&["--color=always", "generate", "--help"], true).contains("\x1b["),
        "an explicit flag beats NO_COLOR"
    );
    assert!(!help(&["--color", "never", "--help"], false).contains("\x1b["));
    assert!(!help(&["--help"], true).contains("\x1b["));
    let o = bm(dir.path()).args(["--color", "sometimes"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("[possible values: auto, always, never]"));
}

#[test]
fn generate_reads_the_prompt_from_a_file_or_stdin_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a b c\nd e f ".repeat(40);
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, &prompt).unwrap();
    let args = ["generate", "--model", FIXTURE, "--max-tokens", "6", "--temperature", "0", "--json"];
    let a = run_ok(bm(dir.path()).args(args).args(["--prompt", &prompt]));
    let b = run_ok(bm(dir.path()).args(args).arg("--prompt-file").arg(&file));
    let c = with_stdin(bm(dir.path()).args(args).args(["--prompt-file", "-"]), &prompt);
    let (a, b, c) = (json(&a), json(&b), json(&c));
    for k in ["text", "prompt_tokens", "generated_tokens"] {
        assert_eq!(a[k], b[k], "{k}");
        assert_eq!(a[k], c[k], "{k}");
    }
    assert!(a["prompt_tokens"].as_u64().unwrap() > 100, "{a}");
    assert!(a["generated_tokens"].as_u64().unwrap() <= 6);
    assert!(
        a["text"].is_string() && a["decode_tok_s"].is_number() && a["stop"].is_string(),
        "{a}"
    );
    // neither or both: clap says so
    let o = bm(dir.path()).args(["generate", "--model", FIXTURE]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bm(dir.path())
        .args(["generate", "--prompt", "x", "--prompt-file", "-"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bm(dir.path())
        .args(["generate", "--prompt-file", "/no/such/prompt.txt"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/no/such/prompt.txt") && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn logits_and_trace_take_text_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let text = "a b c d e f"; // ids below the fixture's 512
    let by_arg = dir.path().join("a.safetensors");
    let by_stdin = dir.path().join("b.safetensors");
    run_ok(
        bm(dir.path())
            .args(["logits", "--model", FIXTURE, "--prompt", text, "--out"])
            .arg(&by_arg),
    );
    let o = with_stdin(
        bm(dir.path())
            .args(["logits", "--model", FIXTURE, "--prompt-file", "-", "--out"])
            .arg(&by_stdin),
        text,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = candle_core::safetensors::load(&by_arg, &candle_core::Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&by_stdin, &candle_core::Device::Cpu).unwrap();
    let ids = a["ids"].to_vec1::<i64>().unwrap();
    assert!(ids.len() >= 4);
    assert_eq!(ids, b["ids"].to_vec1::<i64>().unwrap());

    let out = dir.path().join("t.jsonl");
    let o = with_stdin(
        bm(dir.path())
            .args(["trace", "--model", FIXTURE, "--prompt-file", "-", "--json", "--out"])
            .arg(&out),
        text,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = json(&o);
    assert_eq!(rep["rows"].as_u64().unwrap() as usize, ids.len(), "{rep}");
    assert_eq!(rep["input"], "standard input");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), ids.len());
}

#[test]
fn logits_out_a_folder_fails_before_loading_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    std::fs::create_dir(&target).unwrap();
    let o = bm(dir.path())
        .args(["logits", "--model", FIXTURE, "--ids", "1,2,3", "--out"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is a folder") && err.contains("logits.safetensors"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("out")], "nothing else written");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}

#[test]
fn check_and_eval_print_json() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("r.safetensors");
    run_ok(
        bm(dir.path())
            .args(["logits", "--model", FIXTURE, "--ids", "5,6,7,8", "--out"])
            .arg(&reference),
    );
    let o = run_ok(
        bm(dir.path())
            .args(["check", "--model", FIXTURE, "--json", "--decode-steps", "2", "--reference"])
            .arg(&reference),
    );
    let rep = json(&o);
    assert_eq!(rep["ok"], true);
    assert_eq!(rep["non_finite"], 0);
    assert_eq!(rep["reference"]["agree"], 4);
    assert_eq!(rep["reference"]["top1"].as_array().unwrap().len(), 4);

    let data = dir.path().join("d.txt");
    std::fs::write(&data, "a b c d e f h l m n\n".repeat(30)).unwrap();
    let o = run_ok(
        bm(dir.path())
            .args(["eval", "--model", FIXTURE, "--json", "--seq-len", "16", "--data"])
            .arg(&data),
    );
    let rep = json(&o);
    let (loss, ppl) = (rep["loss"].as_f64().unwrap(), rep["perplexity"].as_f64().unwrap());
    assert!(loss > 0.0 && (ppl - loss.exp()).abs() < 1e-3 * ppl, "{rep}");
    assert!(
        rep["tokens"].as_u64().unwrap() > 100 && rep["sequences"].as_u64().unwrap() > 1,
        "{rep}"
    );
}

#[test]
fn the_config_file_sets_defaults_that_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = dir.path().join("blackmamba");
    std::fs::create_dir(&cfg_dir).unwrap();
    let cfg = cfg_dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!("model = {FIXTURE:?}\ndevice = \"cpu\"\n\n[generate]\nmax-tokens = 3\ntemperature = 0\njson = true\n"),
    )
    .unwrap();
    let o = run_ok(bm(dir.path()).args(["generate", "--prompt", "a b c"]));
    let rep = json(&o);
    assert_eq!(rep["generated_tokens"], 3, "{rep}");
    assert!(rep["model"].as_str().unwrap().contains("tiny-a"), "{rep}");
    let o = run_ok(bm(dir.path()).args(["generate", "--prompt", "a b c", "--max-tokens", "5"]));
    assert_eq!(json(&o)["generated_tokens"], 5);
    let help = String::from_utf8(run_ok(bm(dir.path()).args(["generate", "--help"])).stdout).unwrap();
    assert!(help.contains("[default: 3]"), "{help}");

    // bad keys and values: one line naming the file, the key and the fix; usage status 2
    for (text, want) in [
        ("[generate]\nmax-tokenz = 3\n", "[generate] max-tokenz: unknown option --max-tokenz"),
        ("device = \"gpu\"\n", "device = \"gpu\": invalid value 'gpu'"),
        ("[generate]\nmax-tokens = \"many\"\n", "[generate] max-tokens"),
        ("[genrate]\nx = 1\n", "[genrate]: no such command"),
        ("json = true\n", "json: unknown option --json"),
        ("model = \n", "line 1"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let o = bm(dir.path()).args(["generate", "--prompt", "x"]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(cfg.to_str().unwrap()) && err.contains(want), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn the_manifest_states_the_checked_msrv_and_pins_its_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = std::fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(ci.contains(&format!("MSRV={msrv}")), ".ci/run checks rust-version {msrv}");
    let lock: toml::Table = std::fs::read_to_string(root.join("Cargo.lock")).unwrap().parse().unwrap();
    let deps = manifest["dependencies"].as_table().unwrap();
    for (name, spec) in deps {
        let version = spec.as_str().or_else(|| spec.get("version").and_then(|v| v.as_str()));
        assert!(version.is_none_or(|v| v != "*"), "{name} is not pinned");
    }
    assert!(!deps.contains_key("tokio"), "tokio is unused: see the README");
    assert!(lock["package"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"].as_str() == Some("clap_complete")));
}

#[test]
fn finetune_resume_takes_the_runs_base_model_over_the_config_files_default() {
    use blackmamba::commands::{finetune::resume_base, parse_from, Command as Sub};
    use blackmamba::finetune::adapter::{AdapterMeta, FORMAT, META_FILE};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "model = \"random:tiny\"\n").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let meta = AdapterMeta {
        format: FORMAT.into(),
        method: blackmamba::finetune::Method::Lora,
        base_model: FIXTURE.into(),
        base_config: blackmamba::model::config::Config::from_file(&Path::new(FIXTURE).join("config.json")).unwrap(),
        targets: vec![],
        rank: 4,
        alpha: 8.0,
        train_router: false,
        step: 1,
        data_hash: "0".into(),
        weights: "adapter.safetensors".into(),
    };
    std::fs::write(run.join(META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
    let args = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec!["blackmamba".into(), "finetune".into(), "--data".into(), "d.txt".into()];
        a.extend(["--resume".into(), run.clone().into_os_string()]);
        a.extend(extra.iter().map(|s| s.into()));
        parse_from(a, Some(&cfg)).unwrap()
    };
    // the config file's model is a default: the run's recorded base model wins
    let cli = args(&[]);
    assert!(matches!(cli.command, Some(Sub::Finetune(_))));
    assert!(cli.model.model_from_config);
    assert_eq!(resume_base(&cli.model, Some(&run)).model.as_deref(), Some(FIXTURE));
    // a --model the user gives is kept
    let cli = args(&["--model", "random:tiny"]);
    assert!(!cli.model.model_from_config);
    assert_eq!(resume_base(&cli.model, Some(&run)).model.as_deref(), Some("random:tiny"));
    // without --resume the config file's model is the model
    let cli = parse_from(
        vec!["blackmamba".into(), "generate".into(), "--prompt".into(), "x".into()],
        Some(&cfg),
    )
    .unwrap();
    assert_eq!(cli.model.model.as_deref(), Some("random:tiny"));
}
