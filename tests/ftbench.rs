//! `bench --finetune` on tiny models (CPU): the in-memory trainer it times takes the same steps as
//! the file-based one and writes nothing; the report's counts and times hang together; bad
//! options and flags give one-line errors.

#![allow(clippy::unwrap_used)]

mod ft_common;

use std::process::Command;

use blackmamba::bench::finetune::{random_examples, run, FinetuneBenchOpts};
use blackmamba::finetune::data::{self, DataFormat};
use blackmamba::finetune::{Method, Target, Trainer};
use blackmamba::model::config::LayerKind;
use ft_common::{byte_tokenizer, config, model, run_config, write, TEXT, VOCAB};

fn tiny_opts() -> FinetuneBenchOpts {
    FinetuneBenchOpts {
        seq_len: 12,
        batch: 2,
        warmup: 1,
        steps: 3,
        rank: 4,
        alpha: 8.0,
        ..FinetuneBenchOpts::default()
    }
}

#[test]
fn in_memory_trainer_takes_the_file_trainers_steps_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["r", "4", "r", "4"], 16);
    let base = model(&cfg, 3, true);
    let tok = byte_tokenizer();
    let text = TEXT.repeat(3);
    let data_path = write(dir.path(), "t.txt", &text);
    let mut fc = run_config(data_path.clone(), dir.path().join("file-run"), Method::Lora, 4);
    fc.eval_fraction = 0.2;
    let mut from_file = Trainer::new(&base, &tok, fc.clone()).unwrap();

    // the same examples, split the same way, handed over in memory
    let ds = data::load(&data_path, DataFormat::Auto, &tok, fc.seq_len, VOCAB).unwrap();
    let (train, _held) = data::split(ds.examples, fc.eval_fraction, fc.seed);
    let mut mc = fc.clone();
    mc.out = dir.path().join("never-written");
    let mut in_mem = Trainer::in_memory(&base, &tok, mc, train).unwrap();
    assert_eq!(in_mem.n_trainable(), from_file.n_trainable());
    for _ in 0..4 {
        let a = from_file.step().unwrap();
        let b = in_mem.step().unwrap();
        assert_eq!(a.loss, b.loss, "step {}", a.step);
        assert_eq!(a.grad_norm, b.grad_norm, "step {}", a.step);
        assert_eq!(a.expert_load, b.expert_load, "step {}", a.step);
        let t = in_mem.last_timing();
        assert!(t.total_s > 0.0 && t.forward_s > 0.0 && t.backward_s > 0.0);
        assert!(t.forward_s + t.backward_s + t.optim_s <= t.total_s * (1.0 + 1e-9));
    }
    assert!(in_mem.done());
    assert!(dir.path().join("file-run").join("metrics.jsonl").is_file());
    assert!(!dir.path().join("never-written").exists(), "the in-memory run wrote files");
}

#[test]
fn in_memory_trainer_refuses_bad_settings_and_no_data() {
    let cfg = config(&["r", "4"], 16);
    let base = model(&cfg, 1, false);
    let tok = byte_tokenizer();
    let ex = random_examples(2, 8, VOCAB, 0);
    let c = run_config(Default::default(), Default::default(), Method::Lora, 2);
    let e = Trainer::in_memory(&base, &tok, c.clone(), vec![]).err().unwrap().to_string();
    assert!(e.contains("no training examples"), "{e}");
    let mut bad = c.clone();
    bad.steps = 0;
    let e = Trainer::in_memory(&base, &tok, bad, ex.clone()).err().unwrap().to_string();
    assert!(e.contains("--steps"), "{e}");
    // no data file is needed
    assert!(Trainer::in_memory(&base, &tok, c, ex).is_ok());
}

#[test]
fn random_examples_learn_every_position() {
    let ex = random_examples(3, 10, 50, 7);
    assert_eq!(ex.len(), 3);
    for e in &ex {
        assert_eq!(e.ids.len(), 11);
        assert!(e.ids.iter().all(|&i| i < 50));
        assert_eq!(e.n_targets(), 10);
    }
    assert_ne!(ex[0].ids, ex[1].ids);
    assert_eq!(random_examples(3, 10, 50, 7)[2].ids, ex[2].ids, "seeded");
}

/// LoRA values the trainer adds for `cfg` with every target at `rank` (capped by each linear's
/// smaller side), counted from the config.
fn lora_count(cfg: &blackmamba::model::config::Config, rank: usize) -> usize {
    let (d, di, r, n, f) = (cfg.hidden_size, cfg.d_inner(), cfg.dt_rank(), cfg.state_size, cfg.ffn_hidden_size);
    let ad = |out: usize, inp: usize| rank.min(out.min(inp)) * (out + inp);
    let mut total = 0;
    for i in 0..cfg.num_layers {
        total += match cfg.layer_kind(i) {
            LayerKind::Mamba => ad(2 * di, d) + ad(r + 2 * n, di) + ad(di, r) + ad(d, di),
            LayerKind::Moe { experts } => experts * (ad(cfg.fc1_rows(), d) + ad(d, f)),
            LayerKind::Dense => ad(cfg.fc1_rows(), d) + ad(d, f),
        };
    }
    total
}

#[test]
fn report_counts_and_times_hang_together() {
    let cfg = config(&["r", "4", "r", "4"], 16);
    let base = model(&cfg, 2, true);
    let tok = byte_tokenizer();
    let mut o = tiny_opts();
    o.profile = true;
    let r = run(&base, &tok, "tiny", &o).unwrap();
    assert_eq!(r.device, "cpu");
    assert_eq!(r.method, "lora");
    assert_eq!(r.targets.len(), 5);
    assert_eq!(r.tokens_per_step, 24);
    assert_eq!(r.params_total, cfg.param_counts().0);
    assert_eq!(r.params_trainable, lora_count(&cfg, 4));
    assert_eq!(r.step_secs.len(), 3);
    let mut s = r.step_secs.clone();
    s.sort_by(f64::total_cmp);
    assert_eq!(r.secs_median, s[1]);
    assert!((r.tok_s - 24.0 / s[1]).abs() <= 1e-9 * r.tok_s);
    assert!((r.tok_s_mean - 72.0 / s.iter().sum::<f64>()).abs() <= 1e-9 * r.tok_s_mean);
    // forward + backward: part of each step, and its rate from its own median
    assert_eq!(r.fwd_bwd_secs.len(), 3);
    assert!(r.fwd_bwd_secs.iter().zip(&r.step_secs).all(|(f, s)| *f > 0.0 && f <= s));
    let mut f = r.fwd_bwd_secs.clone();
    f.sort_by(f64::total_cmp);
    assert_eq!(r.fwd_bwd_secs_median, f[1]);
    assert!((r.fwd_bwd_tok_s - 24.0 / f[1]).abs() <= 1e-9 * r.fwd_bwd_tok_s);
    // warm-up + timed + phase-profiled + fine-profiled steps, each a finite loss near ln(vocab)
    assert_eq!(r.losses.len(), 1 + 3 + 3 + 3);
    assert!(
        r.losses.iter().all(|l| l.is_finite() && (*l - (VOCAB as f64).ln()).abs() < 2.0),
        "{:?}",
        r.losses
    );
    let p = r.profile.unwrap();
    assert_eq!(p.steps, 3);
    assert!(p.forward_ms > 0.0 && p.backward_ms > 0.0 && p.optim_ms > 0.0);
    assert!(p.total_ms > 0.0);
    // the fine profile: the forward's parts and the backward's ops, shares summing to one
    let fp = r.fine_profile.unwrap();
    assert_eq!(fp.steps, 3);
    let names = |rows: &[blackmamba::bench::finetune_profile::ProfRow]| rows.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
    let (fwd, bwd) = (names(&fp.forward), names(&fp.backward));
    for want in [
        "block rms_norm",
        "mamba in_proj",
        "mamba out_proj",
        "moe router logits",
        "moe route: logits to host",
    ] {
        assert!(fwd.iter().any(|n| n == want), "{want} not in {fwd:?}");
    }
    for want in ["matmul", "grad accumulate"] {
        assert!(bwd.iter().any(|n| n == want), "{want} not in {bwd:?}");
    }
    for (rows, total) in [(&fp.forward, fp.forward_ms), (&fp.backward, fp.backward_ms)] {
        let share: f64 = rows.iter().map(|x| x.share).sum();
        assert!((share - 1.0).abs() < 1e-9 && total > 0.0, "{share} {total}");
        assert!(rows.windows(2).all(|w| w[0].ms_per_step >= w[1].ms_per_step));
    }
    if cfg!(target_os = "linux") {
        // the process's resident memory (tests share the process, so only its presence is checked)
        let m = r.memory.unwrap();
        assert_eq!(m.kind, "host");
        assert!(m.after_load_mib > 0.0 && m.peak_mib > 0.0, "{m:?}");
    }
    let want = if base.kernels.enabled {
        "fused CPU scan op"
    } else {
        "tensor-op scan"
    };
    assert!(r.scan.starts_with(want), "{}", r.scan);
}

#[test]
fn methods_train_what_they_say() {
    let cfg = config(&["r", "4", "r", "4"], 16);
    let base = model(&cfg, 2, false);
    let tok = byte_tokenizer();
    let mut o = tiny_opts();
    o.steps = 1;
    o.warmup = 0;
    o.method = Method::Router;
    let r = run(&base, &tok, "tiny", &o).unwrap();
    assert_eq!(r.params_trainable, 2 * (4 * 16 + 4), "two routers: (E, d) weight and (E) bias");
    assert!(r.targets.is_empty());
    o.method = Method::Full;
    let r = run(&base, &tok, "tiny", &o).unwrap();
    assert_eq!(r.params_trainable, cfg.param_counts().0);
    o.method = Method::Lora;
    o.targets = vec![Target::InProj];
    o.train_router = true;
    let r = run(&base, &tok, "tiny", &o).unwrap();
    let (d, di) = (cfg.hidden_size, cfg.d_inner());
    assert_eq!(r.params_trainable, 2 * 4 * (2 * di + d) + 2 * (4 * 16 + 4));
    assert_eq!(r.targets, vec!["in_proj".to_string()]);
}

#[test]
fn bad_options_are_one_line_errors() {
    let cfg = config(&["r", "4"], 16);
    let base = model(&cfg, 1, false);
    let tok = byte_tokenizer();
    for (change, flag) in [
        (
            Box::new(|o: &mut FinetuneBenchOpts| o.steps = 0) as Box<dyn Fn(&mut FinetuneBenchOpts)>,
            "--steps",
        ),
        (Box::new(|o: &mut FinetuneBenchOpts| o.seq_len = 1), "--seq-len"),
        (Box::new(|o: &mut FinetuneBenchOpts| o.batch = 0), "--batch"),
        (Box::new(|o: &mut FinetuneBenchOpts| o.rank = 0), "--rank"),
        (Box::new(|o: &mut FinetuneBenchOpts| o.targets = vec![]), "--targets"),
    ] {
        let mut o = tiny_opts();
        change(&mut o);
        let e = run(&base, &tok, "tiny", &o).err().unwrap().to_string();
        assert!(e.contains(flag) && !e.contains('\n'), "{flag}: {e}");
    }
}

fn bm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blackmamba")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_bench_finetune() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["r", "4", "r", "4"], 16);
    let d = dir.path().join("m");
    model(&cfg, 1, true).save_dir(&d, candle_core::DType::F32).unwrap();
    byte_tokenizer().save(d.join("tokenizer.json"), false).unwrap();
    let m = d.display().to_string();
    let common = [
        "bench",
        "--finetune",
        "--model",
        &m,
        "--device",
        "cpu",
        "--seq-len",
        "8",
        "--batch",
        "2",
    ];
    let (ok, out, err) = bm(&[&common[..], &["--steps", "2", "--warmup-steps", "0", "--rank", "2", "--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens_per_step"], 16);
    assert_eq!(v["rank"], 2);
    assert_eq!(v["step_secs"].as_array().unwrap().len(), 2);
    assert_eq!(v["params_trainable"], lora_count(&cfg, 2));
    assert!(v["tok_s"].as_f64().unwrap() > 0.0);

    let (ok, out, err) = bm(&[&common[..], &["--steps", "1", "--warmup-steps", "0", "--method", "full"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("every weight") && out.contains("tok/s"), "{out}");
    assert!(out.contains("fwd+bwd tok/s") && !out.contains("backward by op"), "{out}");

    let (ok, _, err) = bm(&[&common[..], &["--method", "sideways"]].concat());
    assert!(!ok && err.contains("--method sideways"), "{err}");
    let (ok, _, err) = bm(&[&common[..], &["--targets", "in_proj,ffn"]].concat());
    assert!(!ok && err.contains("unknown target 'ffn'"), "{err}");
    // training flags need --finetune; inference flags do not mix with it
    let (ok, _, err) = bm(&["bench", "--model", &m, "--rank", "4"]);
    assert!(!ok && err.contains("--finetune"), "{err}");
    let (ok, _, err) = bm(&[&common[..], &["--gen-len", "4"]].concat());
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

/// `--profile --json` on the embedded model: the forward+backward rate and both fine tables;
/// the text report prints the tables.
#[test]
fn cli_bench_finetune_profile_on_the_embedded_model() {
    let common = [
        "bench",
        "--finetune",
        "--device",
        "cpu",
        "--seq-len",
        "8",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
        "--profile",
    ];
    let (ok, out, err) = bm(&[&common[..], &["--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["fwd_bwd_tok_s"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(v["fwd_bwd_secs"].as_array().unwrap().len(), 1);
    let fp = &v["fine_profile"];
    assert_eq!(fp["steps"], 1);
    for table in ["forward", "backward"] {
        let rows = fp[table].as_array().unwrap();
        assert!(!rows.is_empty(), "{table}: {fp}");
        for key in ["name", "ms_per_step", "calls_per_step", "share"] {
            assert!(!rows[0][key].is_null(), "{table} row without {key}: {fp}");
        }
    }
    let (ok, out, err) = bm(&common);
    assert!(ok, "{err}");
    for want in [
        "fwd+bwd tok/s",
        "training forward by part",
        "backward by op",
        "matmul",
        "mamba in_proj",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

/// The PyTorch baseline computes the same training step: on a model folder written here and a
/// batch of random tokens, `bench/torch_finetune.py --parity` rebuilds the model from the
/// checkpoint and must reproduce the trainer's first loss (Sinkhorn routing) and the norm of the
/// gradient of every weight. Needs a Python with torch, so it only runs when asked:
/// `BM_TORCH_PYTHON=/path/to/python3 cargo test --test ftbench -- --ignored`.
#[test]
#[ignore = "needs python3 with torch: BM_TORCH_PYTHON=python3 cargo test --test ftbench -- --ignored"]
fn torch_baseline_computes_the_same_training_step() {
    let py = std::env::var("BM_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["r", "8", "r", "8"], 32);
    let base = model(&cfg, 5, true);
    let d = dir.path().join("m");
    base.save_dir(&d, candle_core::DType::F32).unwrap();
    let ex = random_examples(2, 40, VOCAB, 9);
    let mut fc = run_config(Default::default(), dir.path().join("unused"), Method::Full, 1);
    fc.seq_len = 40;
    fc.batch = 2;
    let mut tr = Trainer::in_memory(&base, &byte_tokenizer(), fc, ex.clone()).unwrap();
    let r = tr.step().unwrap();
    let ids: Vec<&Vec<u32>> = ex.iter().map(|e| &e.ids).collect();
    let parity = serde_json::json!({"ids": ids, "loss": r.loss, "grad_norm": r.grad_norm});
    std::fs::write(d.join("parity.json"), parity.to_string()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_finetune.py");
    let out = Command::new(&py).arg(script).arg("--parity").arg(&d).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" ok").count(), 2, "{text}");
}
