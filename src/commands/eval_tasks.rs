//! `blackmamba eval --task ...`: zero/few-shot benchmarks from a folder of task files, one table
//! row per (task, metric), every number labelled with its split and shots; `--json` prints one
//! object with the same numbers.

use anyhow::Context;

use super::eval::EvalArgs;
use super::ModelArgs;
use crate::eval::run::{evaluate, EvalOpts, TaskReport};
use crate::eval::tasks::{Task, ALL};
use crate::eval::{data, hub_tasks};
use crate::finetune::loss::inference_view;
use crate::tokenizer::EOS_ID;

/// `eval --task --json`.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    model: &'a str,
    seed: u64,
    limit: Option<usize>,
    tasks: Vec<TaskReport>,
}

/// The tasks named by `--task` (`all` for every one), in the order given, without repeats.
pub fn parse_tasks(names: &[String]) -> anyhow::Result<Vec<Task>> {
    let mut out: Vec<Task> = Vec::new();
    for n in names.iter().filter(|n| !n.trim().is_empty()) {
        let add: Vec<Task> = match n.trim() {
            "all" => ALL.to_vec(),
            other => vec![Task::parse(other).with_context(|| format!("--task {n}"))?],
        };
        for t in add {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!("--task: name at least one task (e.g. --task hellaswag,piqa or --task all)");
    }
    Ok(out)
}

pub fn run(m: &ModelArgs, a: &EvalArgs) -> anyhow::Result<()> {
    let tasks = parse_tasks(&a.task)?;
    if a.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    // Read every task file before loading the model, so a bad file fails fast.
    // Without --task-dir: each task's hub dataset (Parquet), from the cache or downloaded.
    let split = a.split.as_deref();
    let datasets = match &a.task_dir {
        Some(dir) => tasks.iter().map(|&t| data::load(dir, t, split)).collect::<Result<Vec<_>, _>>()?,
        None => {
            let env = super::environment::hub_env();
            tasks
                .iter()
                .map(|&t| hub_tasks::resolve(&env, t, split).and_then(|folder| data::load_folder(&folder, t, split)))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let loaded = super::load(m)?;
    let model = inference_view(&loaded.model)?;
    let opts = EvalOpts {
        shots: a.shots,
        limit: a.limit,
        seed: a.seed,
        reuse_state: !a.no_state_reuse,
    };
    let mut reports = Vec::new();
    for d in &datasets {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {eta}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(d.task.name());
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let r = evaluate(&model, &loaded.tokenizer, EOS_ID, d, &opts, &mut progress)
            .with_context(|| format!("{} ({})", d.task.name(), d.path.display()))?;
        bar.finish_and_clear();
        if !a.json {
            eprintln!(
                "{}: {} docs in {:.1} s: {:.1} docs/s, {:.0} tokens/s (state reuse {})",
                r.task,
                r.docs,
                r.seconds,
                r.docs_per_s,
                r.tokens_per_s,
                if r.state_reuse { "on" } else { "off" }
            );
        }
        reports.push(r);
    }
    if a.json {
        let rep = Report {
            model: &loaded.label,
            seed: a.seed,
            limit: a.limit,
            tasks: reports,
        };
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    print!("{}", table(&reports));
    println!("[{}; few-shot seed {}]", loaded.label, a.seed);
    Ok(())
}

/// The per-task table: one row per metric.
pub fn table(reports: &[TaskReport]) -> String {
    let mut out = format!(
        "{:<14} {:<11} {:>5} {:<10} {:>9} {:>9} {:>6}  {}\n",
        "task", "split", "shots", "metric", "value", "stderr", "docs", "few-shot from"
    );
    for r in reports {
        for (i, m) in r.metrics.iter().enumerate() {
            let stderr = m.stderr.map_or("-".to_string(), |s| format!("±{s:.4}"));
            let (task, from) = if i == 0 { (r.task, r.fewshot_from.as_str()) } else { ("", "") };
            let from = if r.shots == 0 { "" } else { from };
            out.push_str(&format!(
                "{:<14} {:<11} {:>5} {:<10} {:>9.4} {:>9} {:>6}  {}\n",
                task, r.split, r.shots, m.metric, m.value, stderr, r.docs, from
            ));
        }
    }
    out
}
