//! `blackmamba trace`: per-token routing and state telemetry of a text, streamed to JSONL or CSV.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::analysis::input::{self, Input, StreamOpts};
use crate::analysis::trace::{Format, TraceWriter};
use crate::commands::ModelArgs;
use crate::lm::{run, AnyModel};

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The text to trace.
    #[arg(long, conflicts_with = "input")]
    pub prompt: Option<String>,
    /// A UTF-8 text file to trace (read in blocks; any length); `-` reads standard input.
    #[arg(long, visible_alias = "prompt-file", value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// jsonl or csv (default: csv when --out ends in .csv, else jsonl).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Tokens per forward call (the state carries over, so this only trades memory for speed).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Start a fresh state every N tokens (0 = the whole input is one sequence).
    #[arg(long, default_value_t = 0)]
    pub reset_every: usize,
    /// Stop after N tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Print the summary (file, rows, format, tokens, speed) as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `trace --json`.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    out: String,
    format: &'a str,
    rows: usize,
    tokens: usize,
    secs: f64,
    tok_s: f64,
    model: &'a str,
    input: String,
}

pub fn run(m: &ModelArgs, a: &TraceArgs) -> anyhow::Result<()> {
    let input = Input::from_args(a.prompt.as_deref(), a.input.as_deref())?;
    if a.out.is_dir() {
        anyhow::bail!(
            "--out {}: is a folder; give a file name such as {}",
            a.out.display(),
            a.out.join("trace.jsonl").display()
        );
    }
    let format = a.format.unwrap_or_else(|| {
        if a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            Format::Csv
        } else {
            Format::Jsonl
        }
    });
    let loaded = super::load_any(m)?;
    if loaded.untrained {
        eprintln!(
            "note: {} has untrained random weights; its routing is not a trained model's",
            loaded.label
        );
    }
    let opts = StreamOpts {
        chunk: a.chunk,
        reset_every: a.reset_every,
        max_tokens: a.max_tokens,
    };
    let mut w = TraceWriter::create(&a.out, format).with_context(|| format!("creating {}", a.out.display()))?;
    let t0 = std::time::Instant::now();
    let tok = &loaded.tokenizer;
    let res = match &loaded.model {
        AnyModel::BlackMamba(model) => input::run_input(model, tok, &input, opts, &mut |c| w.write_chunk(c.start, c.ids, c.probe, tok)),
        AnyModel::Transformer(model) => {
            let cfg = model.config();
            let kv_cap = cfg.sliding_window.map_or(usize::MAX, |win| win.saturating_sub(1).max(1));
            let any = &loaded.model;
            input::input_ids(tok, &input, a.max_tokens).and_then(|ids| {
                // --reset-every cuts the input into sequences; each starts a fresh cache
                let seq = if a.reset_every == 0 { ids.len() } else { a.reset_every };
                let mut done = 0;
                for (s, part) in ids.chunks(seq).enumerate() {
                    let base = s * seq;
                    done += run::stream(any, part, a.chunk, &mut |c| {
                        w.write_shared(base + c.start, c.seq_pos, c.ids, c.probe, kv_cap, tok)
                    })?
                    .tokens;
                }
                Ok(done)
            })
        }
    };
    let tokens = match res {
        Ok(n) => n,
        Err(e) => {
            w.abandon();
            return Err(e).with_context(|| format!("tracing {}", input.label()));
        }
    };
    let rows = w.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let report = Report {
            out: a.out.display().to_string(),
            format: match format {
                Format::Jsonl => "jsonl",
                Format::Csv => "csv",
            },
            rows,
            tokens,
            secs,
            tok_s: tokens as f64 / secs.max(1e-9),
            model: &loaded.label,
            input: input.label(),
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    eprintln!(
        "wrote {} ({rows} tokens, {format:?}) in {secs:.1} s ({:.0} tok/s)",
        a.out.display(),
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
