//! DPO through the trainer (CPU, tiny models over the byte tokenizer): at step 0 the rewards are
//! 0 and the sigmoid loss is ln 2 (LoRA: the reference is the adapters off; every weight: the
//! stored reference); identical sides give no gradient; a resumed run equals an uninterrupted
//! one bit for bit; a bad line is one error naming the file and the line.

#![allow(clippy::unwrap_used)]

mod ft_common;

use std::path::{Path, PathBuf};

use blackmamba::finetune::dpo::PrefLoss;
use blackmamba::finetune::{metrics, FinetuneConfig, Method, Objective, StepReport, Trainer};
use blackmamba::model::Model;
use ft_common::{byte_tokenizer, config, model, write};

/// Preference pairs: a sensible answer against another question's answer.
fn prefs_jsonl(identical: bool) -> String {
    let qa = [
        ("Hi", "Hello there."),
        ("What sat on the mat?", "The cat sat on the mat."),
        ("Where did the dog sit?", "The dog sat on the log."),
        ("Who sang?", "A bird sang in the tree."),
        ("Where is the bird?", "The bird is in the tree."),
        ("What ran?", "The dog ran to the tree."),
    ];
    let mut s = String::new();
    for (i, (q, a)) in qa.iter().enumerate() {
        let other = if identical { a } else { qa[(i + 1) % qa.len()].1 };
        let line = if i % 2 == 0 {
            serde_json::json!({"prompt": q, "chosen": a, "rejected": other})
        } else {
            let u = serde_json::json!({"role": "user", "content": q});
            serde_json::json!({
                "chosen": [u, {"role": "assistant", "content": a}],
                "rejected": [u, {"role": "assistant", "content": other}],
            })
        };
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s
}

fn dpo_config(data: PathBuf, out: PathBuf, method: Method, steps: usize) -> FinetuneConfig {
    FinetuneConfig {
        objective: Objective::Dpo,
        dpo_beta: 0.5,
        seq_len: 48,
        batch: 3,
        eval_fraction: 0.0,
        lr: 1e-2,
        ..ft_common::run_config(data, out, method, steps)
    }
}

fn base() -> Model {
    model(&config(&["r", "4", "r", "4"], 16), 5, true)
}

fn run(base: &Model, cfg: FinetuneConfig, steps: usize) -> (Trainer, Vec<StepReport>) {
    let mut t = Trainer::new(base, &byte_tokenizer(), cfg).unwrap();
    let reports = (0..steps).map(|_| t.step().unwrap()).collect();
    (t, reports)
}

#[test]
fn step_zero_has_zero_rewards_and_loss_ln2() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "prefs.jsonl", &prefs_jsonl(false));
    let base = base();
    for (method, tol) in [(Method::Lora, 0.0), (Method::Full, 1e-5)] {
        let (_, r) = run(&base, dpo_config(data.clone(), dir.path().join(method.name()), method, 1), 1);
        let p = r[0].pref.unwrap();
        // LoRA: the policy with fresh adapters (B = 0) is the reference bit for bit
        assert!(p.reward_chosen.abs() <= tol && p.reward_rejected.abs() <= tol, "{method:?}: {p:?}");
        assert!(
            (r[0].loss - std::f64::consts::LN_2).abs() <= 1e-6 + tol,
            "{method:?}: loss {}",
            r[0].loss
        );
        assert!(r[0].grad_norm > 1e-6, "{method:?}: the first step must move the weights");
    }
}

#[test]
fn training_raises_the_margin_and_ipo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "prefs.jsonl", &prefs_jsonl(false));
    let base = base();
    for kind in [PrefLoss::Sigmoid, PrefLoss::Ipo] {
        let mut cfg = dpo_config(data.clone(), dir.path().join(kind.name()), Method::Lora, 12);
        cfg.dpo_loss = kind;
        cfg.batch = 6; // the whole set each step
        if kind == PrefLoss::Ipo {
            // IPO's square pulls h to 1/(2β) with no saturation: a gentler step
            cfg.lr = 2e-3;
        }
        let (_, r) = run(&base, cfg, 12);
        eprintln!(
            "{kind:?}: {:?}",
            r.iter().map(|x| (x.loss, x.pref.unwrap().margin)).collect::<Vec<_>>()
        );
        let (first, last) = (r[0].pref.unwrap(), r[11].pref.unwrap());
        assert!(
            last.margin > first.margin + 0.05,
            "{kind:?}: margin {} -> {}",
            first.margin,
            last.margin
        );
        assert!(r[11].loss < r[0].loss, "{kind:?}: loss {} -> {}", r[0].loss, r[11].loss);
        assert!(last.accuracy > 0.5, "{kind:?}: accuracy {}", last.accuracy);
    }
}

#[test]
fn identical_sides_give_no_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let same = write(dir.path(), "same.jsonl", &prefs_jsonl(true));
    let real = write(dir.path(), "real.jsonl", &prefs_jsonl(false));
    let base = base();
    for method in [Method::Lora, Method::Full] {
        let g = |data: &Path, out: &str| run(&base, dpo_config(data.to_path_buf(), dir.path().join(out), method, 2), 2).1;
        let r_same = g(&same, &format!("s{}", method.name()));
        let r_real = g(&real, &format!("r{}", method.name()));
        assert!(r_real[0].grad_norm > 1e-4, "{method:?}");
        for r in &r_same {
            assert!(r.grad_norm <= 1e-6 * r_real[0].grad_norm, "{method:?}: |g| {}", r.grad_norm);
            assert_eq!(r.pref.unwrap().margin, 0.0);
        }
    }
}

#[test]
fn resumed_runs_equal_uninterrupted_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "prefs.jsonl", &prefs_jsonl(false));
    let base = base();
    for method in [Method::Lora, Method::Full] {
        let mk = |out: &str| {
            let mut c = dpo_config(data.clone(), dir.path().join(format!("{out}-{}", method.name())), method, 6);
            c.batch = 2;
            c.grad_accum = 2;
            c
        };
        let key = |r: &StepReport| (r.loss, r.grad_norm, r.pref.unwrap());
        let (_, full) = run(&base, mk("a"), 6);
        let (mut t, first) = run(&base, mk("b"), 3);
        t.save().unwrap();
        drop(t);
        let mut cfg = mk("b");
        cfg.resume = Some(cfg.out.clone());
        let (_, rest) = run(&base, cfg.clone(), 3);
        let resumed: Vec<_> = first.iter().chain(&rest).map(key).collect();
        assert_eq!(full.iter().map(key).collect::<Vec<_>>(), resumed, "{method:?}");
        let lines = metrics::read(&cfg.out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[5].reward_margin, Some(rest[2].pref.unwrap().margin));
        // resuming with another preference loss is refused
        let mut ipo = cfg.clone();
        ipo.dpo_loss = PrefLoss::Ipo;
        let e = Trainer::new(&base, &byte_tokenizer(), ipo).err().unwrap().to_string();
        assert!(e.contains("--dpo-loss") && e.contains("sigmoid"), "{e}");
    }
}

#[test]
fn a_bad_line_is_one_error_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = prefs_jsonl(false) + "{\"prompt\": \"p\", \"chosen\": \"a\"}\n";
    let data = write(dir.path(), "prefs.jsonl", &text);
    let e = Trainer::new(&base(), &byte_tokenizer(), dpo_config(data, dir.path().join("o"), Method::Lora, 1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("prefs.jsonl") && e.contains("line 7") && e.contains("missing \"rejected\""),
        "{e}"
    );
    assert!(
        e.contains("\"prompt\"") && !e.contains('\n'),
        "the error names the fix on one line: {e}"
    );
}
