//! `blackmamba eval --task` end to end on small task files the test writes: the JSON report labels
//! every number (metric, split, shots), equals the library's scoring of the same files, does not
//! change with the state reuse off, and a bad line fails with one line naming file and line.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use blackmamba::eval::data;
use blackmamba::eval::run::{evaluate, EvalOpts};
use blackmamba::eval::tasks::Task;
use candle_core::{DType, Device};
use serde_json::{json, Value};

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

fn write(dir: &Path, task: &str, split: &str, rows: &[Value]) {
    std::fs::create_dir_all(dir.join(task)).unwrap();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join(task).join(format!("{split}.jsonl")), text).unwrap();
}

fn task_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let piqa: Vec<Value> = (0..6)
        .map(|i| json!({"goal": format!("How do I open jar {i}?"), "sol1": "Twist the lid.", "sol2": "Eat the lid quickly.", "label": i % 2}))
        .collect();
    write(dir.path(), "piqa", "validation", &piqa);
    let wino: Vec<Value> = ["1", "2", "1"]
        .iter()
        .map(|a| json!({"sentence": "The cat chased the dog because _ was hungry.", "option1": "the cat", "option2": "the dog", "answer": a}))
        .collect();
    write(dir.path(), "winogrande", "validation", &wino);
    let lambada: Vec<Value> = [
        "Once upon a time there was a little cat",
        "The sun rose over the quiet town",
        "She opened the door and saw her friend",
    ]
    .iter()
    .map(|t| json!({ "text": t }))
    .collect();
    write(dir.path(), "lambada", "test", &lambada);
    dir
}

fn run_json(dir: &Path, extra: &[&str]) -> Value {
    let o = bm()
        .args(["eval", "--dtype", "f32", "--task", "piqa,winogrande,lambada", "--task-dir"])
        .arg(dir)
        .args(["--shots", "2", "--seed", "5", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn metric(task: &Value, name: &str) -> f64 {
    task["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == name).unwrap()["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn eval_task_json_is_labelled_and_equals_the_library() {
    let dir = task_dir();
    let rep = run_json(dir.path(), &[]);
    let tasks = rep["tasks"].as_array().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t["task"].as_str().unwrap()).collect();
    assert_eq!(names, ["piqa", "winogrande", "lambada"]);
    let metrics = |t: &Value| -> Vec<String> {
        t["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["metric"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(metrics(&tasks[0]), ["acc", "acc_norm"]);
    assert_eq!(metrics(&tasks[1]), ["acc"]);
    assert_eq!(metrics(&tasks[2]), ["perplexity", "acc"]);
    for t in tasks {
        assert_eq!(t["shots"], 2);
        assert!(t["docs_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        (tasks[0]["split"].as_str(), tasks[0]["docs"].as_u64()),
        (Some("validation"), Some(6))
    );
    assert_eq!(tasks[2]["split"], "test");
    assert_eq!(tasks[0]["fewshot_from"], "validation (other documents)");

    // The library on the same files and options gives the same numbers.
    let (model, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let opts = EvalOpts {
        shots: 2,
        limit: None,
        seed: 5,
        reuse_state: true,
    };
    for (t, task) in tasks.iter().zip([Task::Piqa, Task::Winogrande, Task::Lambada]) {
        let d = data::load(dir.path(), task, None).unwrap();
        let r = evaluate(&model, &tok, 0, &d, &opts, &mut |_, _| {}).unwrap();
        for m in &r.metrics {
            let got = metric(t, m.metric);
            assert!(
                (got - m.value).abs() <= 1e-9 * m.value.abs().max(1.0),
                "{} {}: {got} vs {}",
                r.task,
                m.metric,
                m.value
            );
        }
    }
    let ppl = metric(&tasks[2], "perplexity");
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");

    // Reading every pair from scratch scores the same.
    let off = run_json(dir.path(), &["--no-state-reuse", "--limit", "4"]);
    let on = run_json(dir.path(), &["--limit", "4"]);
    for (a, b) in on["tasks"].as_array().unwrap().iter().zip(off["tasks"].as_array().unwrap()) {
        assert_eq!(b["state_reuse"], false);
        for m in a["metrics"].as_array().unwrap() {
            let name = m["metric"].as_str().unwrap();
            let (x, y) = (m["value"].as_f64().unwrap(), metric(b, name));
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{} {name}: {x} vs {y}", a["task"]);
        }
    }
}

#[test]
fn eval_task_prints_a_labelled_table_and_refuses_bad_files() {
    let dir = task_dir();
    let o = bm()
        .args(["eval", "--task", "piqa", "--limit", "3", "--task-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.lines().next().unwrap().contains("split") && out.contains("acc_norm"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("piqa") && l.contains("validation") && l.contains(" 3 ")),
        "{out}"
    );
    assert!(String::from_utf8(o.stderr).unwrap().contains("docs/s"));

    std::fs::write(
        dir.path().join("piqa/validation.jsonl"),
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\", \"label\": 0}\n{\"goal\": 3}\n",
    )
    .unwrap();
    let o = bm()
        .args(["eval", "--task", "piqa", "--task-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("validation.jsonl") && err.contains("line 2") && err.contains("goal"),
        "{err}"
    );
    let o = bm()
        .args(["eval", "--task", "mmlu", "--task-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8(o.stderr).unwrap().contains("known: hellaswag"));
}
