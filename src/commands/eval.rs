//! `blackmamba eval`: loss and perplexity of a model (with `--adapter`, of base + adapter) on a
//! data file, routed as at inference (greedy top-1); or, with `--task`, zero/few-shot benchmarks
//! scored as lm-evaluation-harness scores them (see [`crate::eval`] and `docs/eval.md`).

use std::path::PathBuf;

use clap::Args;

use crate::commands::ModelArgs;
use crate::finetune::data::{self, DataFormat};
use crate::finetune::loss::{evaluate, inference_view};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Data file: plain text or JSONL (as for finetune). Or use --task.
    #[arg(long, required_unless_present = "task", conflicts_with = "task")]
    pub data: Option<PathBuf>,
    /// Benchmarks, comma-separated: hellaswag, piqa, arc_easy, arc_challenge, winogrande,
    /// openbookqa, lambada, or all; scored as lm-evaluation-harness does (docs/eval.md).
    #[arg(long, value_delimiter = ',')]
    pub task: Vec<String>,
    /// Folder of task files: TASK/SPLIT.jsonl, TASK/SPLIT/*.arrow (datasets' save_to_disk) or
    /// TASK/SPLIT*.parquet (docs/eval.md). Without it: the task's hub dataset (Parquet), cached.
    #[arg(long, requires = "task")]
    pub task_dir: Option<PathBuf>,
    /// Split to score (default: lm-eval's, else validation, else test, whichever has a file).
    #[arg(long, requires = "task")]
    pub split: Option<String>,
    /// Few-shot examples before each document.
    #[arg(long, requires = "task", default_value_t = 0)]
    pub shots: usize,
    /// Score only the first N documents of each task.
    #[arg(long, requires = "task")]
    pub limit: Option<usize>,
    /// Seed of the few-shot draw and of the bootstrap.
    #[arg(long, requires = "task", default_value_t = 1234)]
    pub seed: u64,
    /// Read every (context, choice) pair from scratch instead of sharing the context's state
    /// among the choices (same scores, slower; for timing the reuse).
    #[arg(long, requires = "task")]
    pub no_state_reuse: bool,
    /// text or jsonl (default: by extension).
    #[arg(long)]
    pub format: Option<String>,
    /// Tokens per sequence (text is cut into windows of this length; longer JSONL lines are cut).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `eval --json`.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    data: String,
    loss: f64,
    perplexity: f64,
    tokens: usize,
    sequences: usize,
    skipped_lines: usize,
    model: &'a str,
}

pub fn run(m: &ModelArgs, a: &EvalArgs) -> anyhow::Result<()> {
    let Some(path) = a.data.as_ref() else {
        return super::eval_tasks::run(m, a);
    };
    if a.seq_len < 2 || a.batch == 0 {
        anyhow::bail!("--seq-len must be at least 2 and --batch at least 1");
    }
    let format = a.format.as_deref().map(DataFormat::parse).transpose()?.unwrap_or_default();
    let loaded = super::load(m)?;
    let ds = data::load(path, format, &loaded.tokenizer, a.seq_len, loaded.model.cfg.vocab_size)?;
    if !ds.bad.is_empty() {
        eprintln!(
            "{}: skipped {} line(s), e.g. line {}: {}",
            path.display(),
            ds.bad.len(),
            ds.bad[0].line,
            ds.bad[0].reason
        );
    }
    let model = inference_view(&loaded.model)?;
    let r = evaluate(&model, &ds.examples, a.batch)?;
    if a.json {
        let rep = Report {
            data: path.display().to_string(),
            loss: r.loss,
            perplexity: r.perplexity,
            tokens: r.tokens,
            sequences: ds.examples.len(),
            skipped_lines: ds.bad.len(),
            model: &loaded.label,
        };
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    println!(
        "{}: loss {:.4} nats/token, perplexity {:.3} over {} tokens ({} sequences) [{}]",
        path.display(),
        r.loss,
        r.perplexity,
        r.tokens,
        ds.examples.len(),
        loaded.label
    );
    Ok(())
}
