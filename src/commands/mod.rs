//! The command line: one subcommand per job; no subcommand opens the TUI (same as `chat`).

pub mod bench;
pub mod generate;
pub mod logits;

use clap::{Args, Parser, Subcommand};

/// A terminal playground for BlackMamba (Mamba + mixture-of-experts language models).
#[derive(Debug, Parser)]
#[command(name = "blackmamba", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Where the model comes from and where it runs: shared by every command.
#[derive(Debug, Args, Clone, Default)]
pub struct ModelArgs {
    /// Model: a folder (config.json + weights), a hub id (Zyphra/BlackMamba-2.8B, aliases 2.8b and
    /// 1.5b) or random:tiny|1.5b|2.8b. Default: the embedded model.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) for a hub id.
    #[arg(long, global = true)]
    pub revision: Option<String>,
    /// tokenizer.json to use instead of the model folder's or the embedded GPT-NeoX one.
    #[arg(long, global = true)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// cpu or cuda (default: cuda when built with it and a GPU is present, else cpu).
    #[arg(long, global = true)]
    pub device: Option<String>,
    /// f32, bf16 or f16 for the matrices (default: bf16 on GPU, f32 on CPU).
    #[arg(long, global = true)]
    pub dtype: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout (stats on stderr).
    Generate(generate::GenerateArgs),
    /// Write teacher-forced logits, experts and router probabilities of token ids to safetensors.
    Logits(logits::LogitsArgs),
    /// Measure prefill and decode speed, launches per token, bandwidth and GPU memory.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Generate(a)) => generate::run(&cli.model, &a),
        Some(Command::Logits(a)) => logits::run(&cli.model, &a),
        Some(Command::Bench(a)) => bench::run(&cli.model, &a),
        None => anyhow::bail!("the TUI is not built yet; try `blackmamba generate --prompt TEXT`"),
    }
}

/// Loads the model the arguments name.
pub fn load(m: &ModelArgs) -> anyhow::Result<crate::loader::Loaded> {
    use anyhow::Context;
    let source = crate::loader::ModelSource::parse(m.model.as_deref(), m.revision.as_deref())?;
    let device = crate::loader::device(m.device.as_deref())?;
    let dtype = crate::loader::dtype(m.dtype.as_deref(), &device)?;
    let opts = crate::loader::LoadOpts {
        tokenizer: m.tokenizer.clone(),
    };
    crate::loader::load(&source, &device, dtype, &opts).with_context(|| format!("loading model {}", source.label()))
}
