//! The command line: one subcommand per job; no subcommand opens the TUI (same as `chat`).

pub mod analyze;
pub mod analyze_compare;
pub mod bench;
pub mod chat;
pub mod check;
pub mod completions;
pub mod environment;
pub mod eval;
pub mod eval_tasks;
pub mod finetune;
pub mod generate;
pub mod launch;
pub mod logits;
pub mod merge;
pub mod models;
pub mod prompt;
pub mod quantize;
pub mod random_checkpoint;
pub mod trace;
pub mod train;
pub mod train_tokenizer;

use clap::{Args, ColorChoice, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::loader::{DTypeArg, DeviceArg};

/// `-V`: the version and the commit it was built from.
const SHORT_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BLACKMAMBA_GIT_COMMIT"), ")");

/// `--version`: version, commit, whether CUDA is compiled in and for which GPU architectures.
pub fn long_version() -> String {
    let cuda = cfg!(feature = "cuda");
    let archs = crate::gpu_arch::built_archs();
    format!(
        "{}\ncommit: {}\nfeatures: cuda {}\ncuda archs: {}",
        env!("CARGO_PKG_VERSION"),
        env!("BLACKMAMBA_GIT_COMMIT"),
        if cuda { "on" } else { "off" },
        if cuda {
            crate::gpu_arch::describe(&archs)
        } else {
            "none (built without --features cuda)".into()
        }
    )
}

/// A terminal playground for BlackMamba (Mamba + mixture-of-experts language models).
///
/// Defaults for any long option can be set in $XDG_CONFIG_HOME/blackmamba/config.toml (see the
/// README); flags and environment variables override it.
#[derive(Debug, Parser)]
#[command(name = "blackmamba", version = SHORT_VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Colour in output and the TUI: auto (a terminal, unless NO_COLOR is set), always or never.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,
    /// TUI options, also accepted without the `chat` subcommand.
    #[command(flatten)]
    pub chat: chat::ChatArgs,
}

/// Where the model comes from and where it runs: shared by every command.
#[derive(Debug, Args, Clone, Default)]
pub struct ModelArgs {
    /// Model: a folder (config.json + weights; an OLMoE or Mixtral folder by its config's model_type),
    /// a hub id (Zyphra/BlackMamba-2.8B, aliases 2.8b and 1.5b), random:tiny|1.5b|2.8b or embedded.
    /// Default: the embedded model.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Whether `model` is the config file's default rather than given by the user (then
    /// `finetune --resume` takes the run's recorded base model instead).
    #[arg(skip)]
    pub model_from_config: bool,
    /// The CUDA device ordinal to use (a data-parallel rank's local rank; 0 otherwise).
    #[arg(skip)]
    pub gpu: usize,
    /// Hub revision (branch, tag or commit) for a hub id.
    #[arg(long, global = true)]
    pub revision: Option<String>,
    /// tokenizer.json to use instead of the model folder's or the embedded GPT-NeoX one.
    #[arg(long, global = true)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Where to run (default: cuda when built with it and a GPU is present, else cpu).
    #[arg(long, global = true, value_enum)]
    pub device: Option<DeviceArg>,
    /// Type of the weight matrices (default: bf16 on GPU, f32 on CPU).
    #[arg(long, global = true, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// A fine-tuned adapter folder (from `finetune` or `train`) to put on the model.
    #[arg(long, global = true)]
    pub adapter: Option<std::path::PathBuf>,
    /// Weight-only quantisation at load (docs/quantization.md): int8 or fp8 (E4M3) with a scale per
    /// output channel, q4 (= q4g64) or q4g128 with a scale per group of 64 / 128 inputs.
    /// Quantised unless --quant-keep names them: in-proj, x-proj, out-proj, fc1, fc2, embedding.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = parse_quant)]
    pub quant: Option<crate::quant::QuantFormat>,
    /// Parts --quant leaves unquantised (comma-separated).
    #[arg(long, global = true, value_enum, value_delimiter = ',', value_name = "PARTS")]
    pub quant_keep: Vec<crate::quant::Part>,
    /// Parts --quant also quantises (comma-separated): router, dt-proj, and, quantised then
    /// dequantised in place, conv, a-log, d, norms.
    #[arg(long, global = true, value_enum, value_delimiter = ',', value_name = "PARTS")]
    pub quant_also: Vec<crate::quant::Part>,
    #[command(flatten)]
    pub kernels: KernelArgs,
}

fn parse_quant(s: &str) -> Result<crate::quant::QuantFormat, String> {
    s.parse().map_err(|e: crate::error::Error| e.to_string())
}

impl ModelArgs {
    /// `--quant` with `--quant-keep` / `--quant-also`; the CPU's GGML matmuls unless
    /// `--no-kernels` (then the dequantise-then-matmul twin).
    pub fn quant_spec(&self) -> anyhow::Result<Option<crate::quant::QuantSpec>> {
        match self.quant {
            Some(f) => Ok(Some(crate::quant::QuantSpec::new(
                f,
                &self.quant_keep,
                &self.quant_also,
                !self.kernels.no_kernels,
            )?)),
            None if !self.quant_keep.is_empty() || !self.quant_also.is_empty() => {
                anyhow::bail!("--quant-keep and --quant-also need --quant FORMAT (int8, fp8, q4 or q4g128)")
            }
            None => Ok(None),
        }
    }
}

/// A/B switches of the fused kernels against their tensor-op twins: each turns one family off
/// (see `model::Kernels`). Parsed here once and handed to the model; every switch also reads its
/// `BLACKMAMBA_*` variable (any value but empty, 0, false, no, off turns it on).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Kernel switches (A/B against the tensor-op twins)")]
pub struct KernelArgs {
    /// Run every op on tensor ops, also on a GPU (the kernels' twin).
    #[arg(long, global = true, env = "BLACKMAMBA_NO_KERNELS", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_kernels: bool,
    /// Decode with one `Model::step` per token instead of the graph-captured CUDA decoder.
    #[arg(long, global = true, env = "BLACKMAMBA_NO_DECODER", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_decoder: bool,
    /// The CUDA decoder copies its logits to the host sampler every token instead of sampling on
    /// the device (the default, where only the token comes back): the device sampler's twin.
    #[arg(long, global = true, env = "BLACKMAMBA_HOST_SAMPLER", value_parser = clap::builder::FalseyValueParser::new())]
    pub host_sampler: bool,
    /// Decode with the CUDA megakernel (one persistent launch per token; issue 17) instead of the
    /// graph-captured decoder. Opt-in until its GPU parity test has run; bf16 and f32 models.
    #[arg(long, global = true, env = "BLACKMAMBA_MEGAKERNEL", value_parser = clap::builder::FalseyValueParser::new())]
    pub megakernel: bool,
    /// Prefill: one product pair per expert instead of two batched cuBLAS calls per MoE layer.
    #[arg(long, global = true, env = "BLACKMAMBA_PER_EXPERT", value_parser = clap::builder::FalseyValueParser::new())]
    pub per_expert: bool,
    /// Fine-tuning: the blocks' RMSNorm as tensor ops instead of the fused op.
    #[arg(long, global = true, env = "BLACKMAMBA_SLOW_RMSNORM", value_parser = clap::builder::FalseyValueParser::new())]
    pub slow_rmsnorm: bool,
    /// Fine-tuning: the loss's cross-entropy as tensor ops on f32 logits.
    #[arg(long, global = true, env = "BLACKMAMBA_SLOW_XENT", value_parser = clap::builder::FalseyValueParser::new())]
    pub slow_xent: bool,
    /// Fine-tuning: Mamba half-blocks through autograd instead of the hand-written backward.
    #[arg(long, global = true, env = "BLACKMAMBA_SLOW_MAMBA_GRAD", value_parser = clap::builder::FalseyValueParser::new())]
    pub slow_mamba_grad: bool,
    /// Fine-tuning: MoE half-blocks through autograd instead of the hand-written backward.
    #[arg(long, global = true, env = "BLACKMAMBA_SLOW_MOE_GRAD", value_parser = clap::builder::FalseyValueParser::new())]
    pub slow_moe_grad: bool,
    /// GPU casts between f32 and bf16/f16 by candle's kernel instead of ours.
    #[arg(long, global = true, env = "BLACKMAMBA_SLOW_CAST", value_parser = clap::builder::FalseyValueParser::new())]
    pub slow_cast: bool,
}

impl KernelArgs {
    /// The model's kernel choice these switches make.
    pub fn kernels(&self) -> crate::model::Kernels {
        crate::model::Kernels {
            enabled: !self.no_kernels,
            batched_experts: !self.per_expert,
            rms_norm: !self.slow_rmsnorm,
            xent: !self.slow_xent,
            mamba_grad: !self.slow_mamba_grad,
            moe_grad: !self.slow_moe_grad,
            decoder: !self.no_decoder,
            sampler: !self.host_sampler,
            megakernel: self.megakernel,
        }
    }

    /// Process-wide set-up the switches ask for: our cast kernels as candle's cast hook on CUDA
    /// builds (candle's hook is global by design), unless `--slow-cast`.
    pub fn install(&self) {
        #[cfg(feature = "cuda")]
        if !self.slow_cast {
            crate::ops::cast::install();
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open the terminal UI (the default when no subcommand is given).
    Chat(chat::ChatArgs),
    /// Generate text from a prompt, streaming it to stdout (stats on stderr).
    Generate(generate::GenerateArgs),
    /// Write teacher-forced logits, experts and router probabilities of token ids to safetensors.
    Logits(logits::LogitsArgs),
    /// Load a checkpoint, run a fixed prompt, report NaN/inf and speed; compare with a reference.
    Check(check::CheckArgs),
    /// Write a checkpoint of random weights in the release format (benchmarks and tests).
    RandomCheckpoint(random_checkpoint::RandomCheckpointArgs),
    /// Train a small byte-level BPE tokenizer (GPT-NeoX layout: id 0 is end-of-text) on text files.
    TrainTokenizer(train_tokenizer::TrainTokenizerArgs),
    /// Write per-token routing and state telemetry of a text as JSON lines or CSV.
    Trace(trace::TraceArgs),
    /// Write a routing report (report.md, report.json, --plot PNGs) of a model on a text.
    Analyze(analyze::AnalyzeArgs),
    /// Fine-tune a model on text or JSONL chat data (LoRA, router-only or full), or on preference
    /// pairs (DPO / IPO: --method dpo, dpo-full).
    Finetune(finetune::FinetuneArgs),
    /// Start the ranks of a data-parallel fine-tuning run on this host: launch --gpus N -- finetune ...
    Launch(launch::LaunchArgs),
    /// Train a model from random weights of a config.json (full training).
    Train(train::TrainArgs),
    /// Print the loss and perplexity of a model (and adapter) on a data file.
    Eval(eval::EvalArgs),
    /// Merge an adapter into its base model and write a model folder.
    Merge(merge::MergeArgs),
    /// Write a quantised checkpoint (--quant FORMAT --out DIR) or compare a quantisation's routing
    /// and perplexity with the unquantised model (--compare, on a text file or a built-in paragraph).
    Quantize(quantize::QuantizeArgs),
    /// Measure prefill and decode speed, launches per token, bandwidth and GPU memory.
    Bench(bench::BenchArgs),
    /// List the models that can be loaded (embedded, hub cache, random shapes) and their status.
    Models(models::ModelsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(completions::CompletionsArgs),
}

/// Parses the command line of this process over the defaults of the config file (see
/// [`crate::config_file`]) and applies `--color`. A usage error exits with status 2 and one line
/// (see [`one_line`]); `--help` and `--version` print and exit 0.
pub fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = crate::config_file::default_path(std::env::var_os("XDG_CONFIG_HOME").as_deref(), std::env::var_os("HOME").as_deref());
    match parse_from(args, config.as_deref()) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit()
            }
            eprintln!("{}", one_line(&e));
            std::process::exit(2);
        }
        Err(ParseError::Config(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    }
}

/// A clap usage error on one line, as every other error of the program: its message and notes
/// (e.g. the possible values), without the usage and "For more information" lines.
pub fn one_line(e: &clap::Error) -> String {
    e.render()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why [`parse_from`] failed.
#[derive(Debug)]
pub enum ParseError {
    /// A usage error, `--help` or `--version` (clap prints and exits).
    Clap(clap::Error),
    /// The config file is unreadable or holds a bad key or value (one line naming the file).
    Config(String),
}

/// [`parse`] of given arguments (the program name first) and config file (none when `None` or
/// missing).
pub fn parse_from(args: Vec<std::ffi::OsString>, config: Option<&std::path::Path>) -> Result<Cli, ParseError> {
    let mut cmd = Cli::command()
        .long_version(long_version())
        .after_help(crate::signals::EXIT_CODES_HELP);
    let mut file_color = None;
    if let Some(path) = config.filter(|p| p.is_file()) {
        let cfg = crate::config_file::ConfigFile::read(path).map_err(|e| ParseError::Config(e.to_string()))?;
        file_color = cfg.color();
        cmd = cfg.apply(cmd).map_err(|e| ParseError::Config(e.to_string()))?;
    }
    // clap colours its own help and errors before the parsed value exists: look for the flag
    let color = color_flag(&args).or(file_color).unwrap_or(ColorChoice::Auto);
    cmd = cmd.color(color);
    let matches = cmd.try_get_matches_from(args).map_err(ParseError::Clap)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(ParseError::Clap)?;
    // a global option's value lands in the subcommand's matches: the deepest one that has it
    let mut m = &matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    cli.model.model_from_config = m.value_source("model") == Some(clap::parser::ValueSource::DefaultValue);
    apply_color(cli.color);
    Ok(cli)
}

/// The last `--color WHEN` / `--color=WHEN` before `--`, if it names a valid choice.
fn color_flag(args: &[std::ffi::OsString]) -> Option<ColorChoice> {
    use clap::ValueEnum;
    let mut found = None;
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        let v = match a.as_ref() {
            "--" => break,
            "--color" => it.next().map(|v| v.to_string()),
            other => other.strip_prefix("--color=").map(str::to_string),
        };
        if let Some(c) = v.and_then(|v| ColorChoice::from_str(&v, false).ok()) {
            found = Some(c);
        }
    }
    found
}

/// `--color` for the TUI (crossterm honours NO_COLOR itself; an explicit choice overrides it).
/// The progress bars draw no colour.
fn apply_color(c: ColorChoice) {
    match c {
        ColorChoice::Always => crossterm::style::force_color_output(true),
        ColorChoice::Never => crossterm::style::force_color_output(false),
        ColorChoice::Auto => {}
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    cli.model.kernels.install();
    match cli.command {
        Some(Command::Generate(a)) => generate::run(&cli.model, &a),
        Some(Command::Logits(a)) => logits::run(&cli.model, &a),
        Some(Command::Check(a)) => check::run(&cli.model, &a),
        Some(Command::RandomCheckpoint(a)) => random_checkpoint::run(&a),
        Some(Command::TrainTokenizer(a)) => train_tokenizer::run(&a),
        Some(Command::Trace(a)) => trace::run(&cli.model, &a),
        Some(Command::Analyze(a)) => analyze::run(&cli.model, &a),
        Some(Command::Finetune(a)) => finetune::run(&cli.model, &a),
        Some(Command::Launch(a)) => launch::run(&a),
        Some(Command::Train(a)) => train::run(&cli.model, &a),
        Some(Command::Eval(a)) => eval::run(&cli.model, &a),
        Some(Command::Merge(a)) => merge::run(&cli.model, &a),
        Some(Command::Chat(a)) => chat::run(&cli.model, &a.or(cli.chat)),
        Some(Command::Bench(a)) => bench::run(&cli.model, &a),
        Some(Command::Quantize(a)) => quantize::run(&cli.model, &a),
        Some(Command::Models(a)) => models::run(&a),
        Some(Command::Completions(a)) => completions::run(&a),
        None => chat::run(&cli.model, &cli.chat),
    }
}

/// Loads the model the arguments name.
pub fn load(m: &ModelArgs) -> anyhow::Result<crate::loader::Loaded> {
    use anyhow::Context;
    let source = crate::loader::ModelSource::parse(m.model.as_deref(), m.revision.as_deref())?;
    let device = crate::loader::device_on(m.device, m.gpu)?;
    let dtype = crate::loader::dtype(m.dtype, &device);
    let opts = crate::loader::LoadOpts {
        tokenizer: m.tokenizer.clone(),
        progress: Some(cli_progress()),
        hub: Some(environment::hub_env()),
    };
    let mut loaded = crate::loader::load(&source, &device, dtype, &opts).with_context(|| format!("loading model {}", source.label()))?;
    loaded.model.kernels = m.kernels.kernels();
    for note in &loaded.notes {
        eprintln!("note: {note}");
    }
    if let Some(dir) = &m.adapter {
        crate::finetune::adapter::apply_merged(&mut loaded.model, dir).with_context(|| format!("loading adapter {}", dir.display()))?;
        loaded.label = format!("{} + adapter {}", loaded.label, dir.display());
    }
    if m.kernels.no_kernels {
        crate::quant::apply::set_ggml(&mut loaded.model, false)?;
    }
    if let Some(q) = m.quant_spec()? {
        crate::quant::apply::quantize_loaded(&mut loaded, &q).with_context(|| format!("quantising {} to {}", source.label(), q.format))?;
    }
    Ok(loaded)
}

/// Loads `--model` of either family (see [`crate::lm`]): a folder whose config.json names
/// `olmoe` or `mixtral` as a transformer, anything else as [`load`] does. An adapter applies to
/// BlackMamba only.
pub fn load_any(m: &ModelArgs) -> anyhow::Result<crate::lm::AnyLoaded> {
    use anyhow::Context;
    let source = crate::loader::ModelSource::parse(m.model.as_deref(), m.revision.as_deref())?;
    if !crate::lm::is_transformer(&source)? {
        return Ok(load(m)?.into());
    }
    if let Some(dir) = &m.adapter {
        anyhow::bail!(
            "--adapter {}: adapters apply to BlackMamba models; {} is a transformer checkpoint",
            dir.display(),
            source.label()
        );
    }
    if let Some(q) = m.quant {
        anyhow::bail!(
            "--quant {q}: quantisation applies to BlackMamba models; {} is a transformer checkpoint",
            source.label()
        );
    }
    let device = crate::loader::device_on(m.device, m.gpu)?;
    let dtype = crate::loader::dtype(m.dtype, &device);
    let opts = crate::loader::LoadOpts {
        tokenizer: m.tokenizer.clone(),
        progress: Some(cli_progress()),
        hub: Some(environment::hub_env()),
    };
    crate::lm::load_any(&source, &device, dtype, &opts).with_context(|| format!("loading model {}", source.label()))
}

/// A progress bar on stderr for downloads, conversion and reading (hidden when not a terminal).
fn cli_progress() -> crate::loader::ProgressFn {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{msg:>24} [{bar:30}] {percent:>3}% {eta}").map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    let stage = std::sync::Mutex::new(String::new());
    std::sync::Arc::new(move |p: &crate::loader::LoadProgress| {
        if p.stage == "ready" {
            bar.finish_and_clear();
            return;
        }
        if let Ok(mut s) = stage.lock() {
            if *s != p.stage {
                s.clone_from(&p.stage);
                bar.set_message(p.stage.clone());
                bar.set_position(0);
            }
        }
        bar.set_length(p.total);
        bar.set_position(p.done);
    })
}
