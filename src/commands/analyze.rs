//! `blackmamba analyze`: the routing report (report.md + report.json, optional PNG figures) of a
//! model on a text, optionally with the routing drift against a second model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::analysis::input::{Input, StreamOpts};
use crate::analysis::report::{Report, ReportOpts, RunInfo};
use crate::analysis::{self, CollectOpts};
use crate::commands::ModelArgs;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// A UTF-8 text file to analyse (read in blocks; any length).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Or a text given inline.
    #[arg(long, conflicts_with = "input")]
    pub prompt: Option<String>,
    /// Output folder (created if missing) for report.md, report.json and the figures.
    #[arg(long)]
    pub out: PathBuf,
    /// One model: the routing drift of --model against it (same MoE layout), e.g. the model before
    /// fine-tuning. Two models A B (any family: BlackMamba, OLMoE, Mixtral; same forms as --model,
    /// `embedded` for the built-in one): the two side by side on the --text set (report.md,
    /// compare.json and PNG figures in --out).
    #[arg(long, num_args = 1..=2, value_names = ["A", "B"])]
    pub compare: Vec<String>,
    /// The text set of `--compare A B`: UTF-8 files (one source, or domain, each) or folders of
    /// .txt/.md files (repeatable).
    #[arg(long, value_name = "PATH")]
    pub text: Vec<PathBuf>,
    /// Also write PNG figures.
    #[arg(long)]
    pub plot: bool,
    /// Tokens in the route heatmap figure (token texts label the columns up to 64).
    #[arg(long, default_value_t = 160)]
    pub heatmap_tokens: usize,
    /// Tokens per Sinkhorn window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Cap on Sinkhorn iterations per window (the reference has none).
    #[arg(long, default_value_t = 1000)]
    pub max_iters: usize,
    /// Tokens listed per expert.
    #[arg(long, default_value_t = 8)]
    pub top: usize,
    /// Least count of a token on an expert for the PMI ranking.
    #[arg(long, default_value_t = 5)]
    pub min_count: u64,
    /// Tokens per forward call (the state carries over, so this only trades memory for speed).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Start a fresh state every N tokens (0 = the whole input is one sequence).
    #[arg(long, default_value_t = 0)]
    pub reset_every: usize,
    /// Stop after N tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
}

pub(super) fn progress(label: &str) -> impl FnMut(usize) + '_ {
    let t0 = std::time::Instant::now();
    let mut last = 0.0;
    move |n| {
        let s = t0.elapsed().as_secs_f64();
        if s - last >= 2.0 {
            last = s;
            eprint!("\r{label}: {n} tokens, {:.0} tok/s   ", n as f64 / s.max(1e-9));
            let _ = std::io::stderr().flush();
        }
    }
}

pub fn run(m: &ModelArgs, a: &AnalyzeArgs) -> anyhow::Result<()> {
    if a.compare.len() == 2 {
        return super::analyze_compare::run(m, a);
    }
    if !a.text.is_empty() {
        anyhow::bail!("--text: the text set is for --compare A B; give one model's text with --input FILE");
    }
    let input = Input::from_args(a.prompt.as_deref(), a.input.as_deref())?;
    if a.window < 2 {
        anyhow::bail!("--window {}: a Sinkhorn window needs at least 2 tokens", a.window);
    }
    if a.max_iters == 0 {
        anyhow::bail!("--max-iters 0: allow at least 1 Sinkhorn iteration");
    }
    if a.top == 0 {
        anyhow::bail!("--top 0: list at least 1 token per expert");
    }
    let opts = CollectOpts {
        stream: StreamOpts {
            chunk: a.chunk,
            reset_every: a.reset_every,
            max_tokens: a.max_tokens,
        },
        window: a.window,
        max_iters: a.max_iters,
    };
    let t0 = std::time::Instant::now();
    let loaded = super::load(m)?;
    if loaded.untrained {
        eprintln!(
            "note: {} has untrained random weights; its routing is not a trained model's",
            loaded.label
        );
    }
    let info = RunInfo {
        model: loaded.label.clone(),
        untrained: loaded.untrained,
        input: input.label(),
        num_layers: loaded.model.cfg.num_layers,
        chunk: a.chunk,
        reset_every: a.reset_every,
    };
    let tok = loaded.tokenizer;
    let collected = analysis::collect(&loaded.model, &tok, &input, opts, &mut progress(&loaded.label))
        .with_context(|| format!("running {} on {}", loaded.label, input.label()))?;
    eprintln!(
        "\r{}: {} tokens in {:.1} s          ",
        loaded.label,
        collected.routes.n_tokens(),
        t0.elapsed().as_secs_f64()
    );
    drop(loaded.model);
    let other = match a.compare.first() {
        Some(spec) => {
            let m2 = ModelArgs {
                model: Some(spec.clone()),
                ..m.clone()
            };
            let other = super::load(&m2).with_context(|| format!("--compare {spec}"))?;
            let rt = analysis::routes_of(&other.model, &collected.routes.ids, opts.stream, &mut progress(&other.label))
                .with_context(|| format!("running {} on {}", other.label, input.label()))?;
            eprintln!();
            Some((other.label, rt))
        }
        None => None,
    };
    let ropts = ReportOpts {
        top: a.top,
        min_count: a.min_count,
        seed: 0,
    };
    let mut report = Report::build(&info, &collected, other.as_ref().map(|(l, rt)| (l.as_str(), rt)), &tok, ropts)?;
    if a.plot {
        analysis::write_plots(&mut report, &collected.routes, &tok, a.heatmap_tokens, &a.out)
            .with_context(|| format!("writing figures into {}", a.out.display()))?;
    }
    report
        .write(&a.out)
        .with_context(|| format!("writing the report into {}", a.out.display()))?;
    eprintln!(
        "wrote {}/report.md and report.json{} ({} tokens, {} MoE layers) in {:.1} s",
        a.out.display(),
        if report.meta.plots.is_empty() {
            String::new()
        } else {
            format!(" and {} figures", report.meta.plots.len())
        },
        report.meta.tokens,
        report.layers.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
