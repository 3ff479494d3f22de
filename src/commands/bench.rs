//! `blackmamba bench`: prefill and decode speed of a model (see [`crate::bench`]); with
//! `--finetune`, the speed and memory of the training step (see [`crate::bench::finetune`]).

use clap::Args;

use crate::bench::context::{ContextFill, ContextOpts, ContextReport};
use crate::bench::finetune::{FinetuneBenchOpts, FinetuneBenchReport};
use crate::bench::{self, BenchOpts, BenchReport};
use crate::commands::ModelArgs;
use crate::finetune::{FirstPass, Method, Recompute, Target};

/// Inference flags that mean nothing to `--finetune`.
const INFERENCE_ONLY: [&str; 9] = [
    "prompt_len",
    "path",
    "prefill_batch",
    "gen_len",
    "reps",
    "modes",
    "step_tokens",
    "sweep",
    "slow_prefill",
];

/// `bench --path`: which decode path to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPath {
    /// `generate` with the default sampling settings (what a user runs).
    User,
    /// The bare decoder kernels, greedy (the `graph` mode).
    Kernel,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Time the training step (forward, backward, AdamW update) instead of inference, on random
    /// tokens: tokens/s and peak GPU memory.
    #[arg(long, conflicts_with_all = INFERENCE_ONLY)]
    pub finetune: bool,
    /// --finetune: what is trained: lora, router or full.
    #[arg(long, default_value = "lora", requires = "finetune")]
    pub method: String,
    /// --finetune: LoRA targets, comma-separated (in_proj,x_proj,dt_proj,out_proj,experts) or all.
    #[arg(long, default_value = "all", requires = "finetune")]
    pub targets: String,
    /// --finetune: LoRA rank.
    #[arg(long, default_value_t = 16, requires = "finetune")]
    pub rank: usize,
    /// --finetune: LoRA alpha.
    #[arg(long, default_value_t = 32.0, requires = "finetune")]
    pub alpha: f64,
    /// --finetune: with --method lora, also train the routers.
    #[arg(long, requires = "finetune")]
    pub train_router: bool,
    /// --finetune: tokens per training sequence.
    #[arg(long, default_value_t = 2048, requires = "finetune")]
    pub seq_len: usize,
    /// --finetune: sequences per step (one micro-batch).
    #[arg(long, default_value_t = 8, requires = "finetune")]
    pub batch: usize,
    /// --finetune: recompute each layer's activations in the backward pass: auto (on CUDA), on, off.
    #[arg(long, default_value = "auto", requires = "finetune")]
    pub recompute: String,
    /// --finetune: how a recomputed step's first pass (layer boundaries and routing, not
    /// differentiated) runs: kernels (the fused inference kernels, on CUDA) or ops (the
    /// differentiable tensor ops, as the recomputed pass).
    #[arg(long, default_value = "kernels", requires = "finetune")]
    pub first_pass: String,
    /// --finetune: timed steps.
    #[arg(long, default_value_t = 5, requires = "finetune")]
    pub steps: usize,
    /// --finetune: untimed steps before them.
    #[arg(long, default_value_t = 2, requires = "finetune")]
    pub warmup_steps: usize,
    /// Prompt tokens of the timed prefill (random ids).
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Sequences in the timed prefill (decode is always batch 1).
    #[arg(long, default_value_t = 1)]
    pub prefill_batch: usize,
    /// Tokens generated per decode mode.
    #[arg(long, default_value_t = 256)]
    pub gen_len: usize,
    /// Timed prefill repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Decode modes, comma-separated: step, step-slow, user (`generate` with the default sampling:
    /// the path users run), and on CUDA the bare decoder: eager, graph, graph-nopdl, pipelined,
    /// graph-probe, graph-dense (a `--quant` model's dense copies, the quantised kernels' twin),
    /// and mega (the opt-in megakernel); mega and graph-dense are not in the default list
    /// (default: step, user, eager, graph, graph-nopdl, pipelined, graph-probe).
    #[arg(long, value_delimiter = ',', conflicts_with = "path")]
    pub modes: Vec<String>,
    /// Shorthand for the decode modes: `user` (= --modes user: `generate` with the default
    /// sampling, the path the TUI and `generate` run) or `kernel` (= --modes graph: the bare
    /// decoder, greedy).
    #[arg(long, value_enum)]
    pub path: Option<BenchPath>,
    /// Tokens for the step modes (at most --gen-len).
    #[arg(long, default_value_t = 64)]
    pub step_tokens: usize,
    /// Also time the graph mode over a grid of launch shapes.
    #[arg(long)]
    pub sweep: bool,
    /// Generated-token counts at which GPU memory is sampled (graph mode).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    pub mem_points: Vec<usize>,
    /// Also time the prefill on the tensor-op path (the kernels' slow twin).
    #[arg(long)]
    pub slow_prefill: bool,
    /// Also break down one prefill and the decode step by part / kernel (CUDA); with --finetune,
    /// time forward, backward and update of a few extra steps (waiting for the device between),
    /// then break a few more down: the training forward by part and the backward by op.
    #[arg(long)]
    pub profile: bool,
    /// Decoder: threads per block of its matrix-vector kernels.
    #[arg(long, default_value_t = 256)]
    pub threads: u32,
    /// Decoder: cap of blocks per multiprocessor of its matrix-vector kernels.
    #[arg(long, default_value_t = 8)]
    pub blocks_per_sm: u32,
    /// Decoder: K slices of out_proj and fc2 (0 = 2).
    #[arg(long, default_value_t = 0)]
    pub split_k: u32,
    /// Decoder: no programmatic dependent launch.
    #[arg(long)]
    pub no_pdl: bool,
    /// Seed of the random weights and prompt.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON only.
    #[arg(long)]
    pub json: bool,
    /// Decode speed against context length instead: comma-separated token counts (1k = 1024),
    /// e.g. 1k,4k,16k,64k. Any family --model loads (BlackMamba, OLMoE, Mixtral); --gen-len tokens
    /// are generated after each context with the default sampling (the user's path).
    #[arg(long, value_name = "LIST", conflicts_with_all = CONTEXT_EXCLUDES)]
    pub context: Option<String>,
    /// --context: how the context gets into the cache or state: prefill (run random tokens through
    /// the model) or synthetic (a cache of as many random keys and values; a random state).
    #[arg(long, value_enum, default_value = "prefill", requires = "context")]
    pub context_fill: ContextFill,
    /// --context: tokens per forward call of the prefill fill.
    #[arg(long, default_value_t = 512, requires = "context")]
    pub fill_chunk: usize,
    /// --context: also draw decode tok/s against context as a PNG.
    #[arg(long, value_name = "FILE", requires = "context")]
    pub plot: Option<std::path::PathBuf>,
    /// --plot: also draw the curves of earlier `bench --context --json` reports (e.g. another
    /// model's), comma-separated files.
    #[arg(long, value_name = "JSON", value_delimiter = ',', requires = "plot")]
    pub plot_with: Vec<std::path::PathBuf>,
}

/// Flags that mean nothing to `--context`.
const CONTEXT_EXCLUDES: [&str; 7] = ["finetune", "modes", "path", "sweep", "slow_prefill", "profile", "prefill_batch"];

/// `bench --context`: decode speed against context length, on either family.
fn run_context(m: &ModelArgs, a: &BenchArgs, list: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let contexts = bench::context::parse_contexts(list)?;
    let mut others = Vec::new();
    for p in &a.plot_with {
        let text = std::fs::read_to_string(p).with_context(|| format!("--plot-with {}: cannot read it", p.display()))?;
        let rep: ContextReport =
            serde_json::from_str(&text).with_context(|| format!("--plot-with {}: not a `bench --context --json` report", p.display()))?;
        others.push(rep);
    }
    let l = super::load_any(m)?;
    let opts = ContextOpts {
        contexts,
        gen_len: a.gen_len,
        fill: a.context_fill,
        chunk: a.fill_chunk,
        seed: a.seed,
    };
    bench::context::check(&l.model, &opts)?;
    if !a.json {
        eprintln!("loaded {} in {:.1} s", l.label, l.load_secs);
    }
    let rep = bench::context::run(&l.model, &l.tokenizer, &l.eos, &l.label, &opts)?;
    if let Some(path) = &a.plot {
        let mut all = vec![rep.clone()];
        all.extend(others);
        bench::context_plot::latency_by_context(&all, path)?;
        if !a.json {
            eprintln!("wrote {}", path.display());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_context(&rep, a.gen_len);
    }
    Ok(())
}

fn print_context(r: &ContextReport, gen_len: usize) {
    let fill = match r.fill {
        ContextFill::Prefill => "filled by prefill",
        ContextFill::Synthetic => "filled synthetically",
    };
    println!(
        "decode speed against context: {} ({}) on {} ({}), contexts {fill}, {gen_len} tokens each with the default sampling",
        r.model, r.family, r.device, r.dtype
    );
    let mem = if r.memory == "state" { "state bytes" } else { "KV-cache bytes" };
    println!("{:>9} {:>10} {:>10} {:>15} {:>8}", "context", "tok/s", "ms/token", mem, "fill s");
    for x in &r.rows {
        println!(
            "{:>9} {:>10.1} {:>10.3} {:>15} {:>8.2}",
            x.context, x.tok_s, x.ms_per_token, x.memory_bytes, x.fill_secs
        );
    }
}

pub fn run(m: &ModelArgs, a: &BenchArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(list) = &a.context {
        return run_context(m, a, list);
    }
    let device = crate::loader::device(m.device)?;
    let dtype = crate::loader::dtype(m.dtype, &device);
    let source = crate::loader::ModelSource::parse(m.model.as_deref(), m.revision.as_deref())?;
    let t0 = std::time::Instant::now();
    let (mut model, label, tok) = match &source {
        // the released shapes with random weights drawn on the GPU (seconds, not minutes)
        crate::loader::ModelSource::Random { shape, seed } if device.is_cuda() && shape != "tiny" => {
            let cfg = crate::loader::random_config(shape);
            let mut model =
                bench::device_random::random_model(&cfg, *seed, &device, dtype).with_context(|| format!("building random:{shape}"))?;
            model.kernels = m.kernels.kernels();
            let mut label = source.label();
            if let Some(q) = m.quant_spec()? {
                crate::quant::apply::quantize_model(&mut model, &q)
                    .with_context(|| format!("quantising random:{shape} to {}", q.format))?;
                label = format!("{label} [{}]", q.format);
            }
            (model, label, None)
        }
        _ => {
            let l = super::load(m)?;
            (l.model, l.label, Some(l.tokenizer))
        }
    };
    if !a.json {
        eprintln!("loaded {label} in {:.1} s", t0.elapsed().as_secs_f64());
    }
    if a.finetune {
        let tok = match tok {
            Some(t) => t,
            None => crate::tokenizer::neox()?,
        };
        let opts = finetune_opts(a)?;
        let rep = bench::finetune::run(&model, &tok, &label, &opts)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else {
            print_finetune(&rep);
        }
        return Ok(());
    }
    let opts = BenchOpts {
        prompt_len: a.prompt_len,
        prefill_batch: a.prefill_batch,
        gen_len: a.gen_len,
        reps: a.reps,
        modes: match (a.path, a.modes.is_empty()) {
            (Some(BenchPath::User), _) => vec!["user".into()],
            (Some(BenchPath::Kernel), _) => vec!["graph".into()],
            (None, true) => bench::default_modes(&device),
            (None, false) => a.modes.clone(),
        },
        step_tokens: a.step_tokens,
        sweep: a.sweep,
        seed: a.seed,
        mem_points: a.mem_points.clone(),
        slow_prefill: a.slow_prefill,
        profile: a.profile,
        #[cfg(feature = "cuda")]
        decode: crate::runtime::decode::DecodeOpts {
            threads: a.threads,
            blocks_per_sm: a.blocks_per_sm,
            split_k: a.split_k,
            pdl: !a.no_pdl,
            ..Default::default()
        },
        tokenizer: tok,
    };
    let rep = bench::run(&mut model, &label, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_report(&rep);
    }
    Ok(())
}

/// The options of `--finetune` from the flags.
fn finetune_opts(a: &BenchArgs) -> anyhow::Result<FinetuneBenchOpts> {
    Ok(FinetuneBenchOpts {
        method: Method::parse(&a.method)?,
        targets: Target::parse_list(&a.targets)?,
        rank: a.rank,
        alpha: a.alpha,
        train_router: a.train_router,
        seq_len: a.seq_len,
        batch: a.batch,
        warmup: a.warmup_steps,
        steps: a.steps,
        profile: a.profile,
        seed: a.seed,
        recompute: Recompute::parse(&a.recompute)?,
        first_pass: FirstPass::parse(&a.first_pass)?,
    })
}

fn print_finetune(r: &FinetuneBenchReport) {
    let what = match r.method.as_str() {
        "lora" => format!(
            "LoRA rank {} alpha {} on {}{}",
            r.rank,
            r.alpha,
            r.targets.join(","),
            if r.train_router { " + routers" } else { "" }
        ),
        "router" => "the routers".to_string(),
        _ => "every weight".to_string(),
    };
    println!(
        "finetune step of {} on {} ({}): {what}; {:.1}M of {:.0}M parameters trainable",
        r.model,
        r.device,
        r.dtype,
        r.params_trainable as f64 / 1e6,
        r.params_total as f64 / 1e6
    );
    println!(
        "scan: {}; activations: {}",
        r.scan,
        if r.recompute {
            "recomputed layer by layer in the backward pass"
        } else {
            "all kept for the backward pass"
        }
    );
    println!(
        "batch {} x seq {} = {} tokens per step; {} timed steps: median {:.1} ms, {:.0} tok/s (mean {:.0} tok/s)",
        r.batch,
        r.seq_len,
        r.tokens_per_step,
        r.step_secs.len(),
        r.secs_median * 1e3,
        r.tok_s,
        r.tok_s_mean
    );
    println!(
        "fwd+bwd of the same steps (no optimiser: up to the loss read): median {:.1} ms, {:.0} fwd+bwd tok/s",
        r.fwd_bwd_secs_median * 1e3,
        r.fwd_bwd_tok_s
    );
    let losses: Vec<String> = r.losses.iter().map(|l| format!("{l:.3}")).collect();
    println!("loss per step: {}", losses.join(" "));
    if let Some(p) = &r.profile {
        println!(
            "phases (median of {} steps, synchronised): forward {:.1} ms, backward {:.1} ms, update {:.1} ms, step {:.1} ms",
            p.steps, p.forward_ms, p.backward_ms, p.optim_ms, p.total_ms
        );
        let parts: Vec<String> = p.parts.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
        if !parts.is_empty() {
            println!("parts (ms): {}", parts.join(", "));
        }
    }
    if let Some(p) = &r.fine_profile {
        for l in bench::finetune_profile::report_lines(p, r.recompute, 25) {
            println!("{l}");
        }
    }
    if let Some(m) = &r.memory {
        let what = if m.kind == "gpu" {
            "GPU memory in use"
        } else {
            "resident host memory"
        };
        println!(
            "{what} (MiB): after load {:.0}, after setup {:.0}, peak during the steps {:.0}",
            m.after_load_mib, m.after_setup_mib, m.peak_mib
        );
    }
}

fn print_report(r: &BenchReport) {
    println!(
        "model {} on {} ({}): {:.0}M params, {:.0}M active, {:.1} MB read per token",
        r.model,
        r.device,
        r.dtype,
        r.params_total as f64 / 1e6,
        r.params_active as f64 / 1e6,
        r.bytes_per_token as f64 / 1e6
    );
    if r.bytes_per_token_dense != r.bytes_per_token {
        println!(
            "  quantised: {:.1} MB per token packed (decoder), {:.1} MB over the dense copies (step, graph-dense)",
            r.bytes_per_token as f64 / 1e6,
            r.bytes_per_token_dense as f64 / 1e6
        );
    }
    if let Some(c) = r.hbm_copy_gb_s {
        println!("device copy bandwidth (measured ceiling): {c:.0} GB/s");
    }
    if let Some(p) = &r.prefill {
        println!(
            "prefill: batch {} x {} tokens in {:.2} ms (median of {}): {:.0} tok/s",
            p.batch,
            p.prompt_len,
            p.secs_median * 1e3,
            p.secs_all.len(),
            p.tok_s
        );
    }
    if let Some(p) = &r.prefill_slow {
        println!(
            "prefill on the tensor-op path: batch {} x {} tokens in {:.2} ms: {:.0} tok/s",
            p.batch,
            p.prompt_len,
            p.secs_median * 1e3,
            p.tok_s
        );
    }
    println!(
        "{:<12} {:>7} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7}  note",
        "decode", "tokens", "tok/s", "p50 ms", "p99 ms", "launch/t", "GB/s", "%ceil"
    );
    for d in &r.decode {
        println!(
            "{:<12} {:>7} {:>10.1} {:>9.3} {:>9.3} {:>9} {:>8.0} {:>7}  {}",
            d.mode,
            d.tokens,
            d.tok_s,
            d.ms_p50,
            d.ms_p99,
            d.launches_per_token.map_or("-".into(), |x| x.to_string()),
            d.gb_s,
            d.pct_of_measured_ceiling.map_or("-".into(), |x| format!("{x:.0}")),
            d.note
        );
    }
    if let Some(p) = r.probe_overhead_pct {
        println!("probe overhead (graph-probe vs graph): {p:.2}%");
    }
    if let Some(m) = &r.memory {
        let pts: Vec<String> = m.during_decode_mib.iter().map(|(t, v)| format!("{t} tok: {v:.0}")).collect();
        println!(
            "GPU memory in use (MiB): after load {:.0}, after prefill {:.0}, during decode [{}], peak {:.0}",
            m.after_load_mib,
            m.after_prefill_mib,
            pts.join(", "),
            m.peak_mib
        );
    }
    if !r.prefill_profile.is_empty() {
        println!("prefill breakdown (synchronised after each part):");
        for (n, ms, c) in &r.prefill_profile {
            println!("  {n:<24} {ms:>9.3} ms  ({c} calls)");
        }
    }
    if !r.decode_profile.is_empty() {
        let total: f64 = r.decode_profile.iter().map(|x| x.1).sum();
        println!("decode step breakdown (eager, an event around each kernel; total {total:.1} µs):");
        for (n, us, c) in &r.decode_profile {
            println!("  {n:<26} {us:>8.1} µs  ({c} launches)");
        }
    }
    for s in &r.sweep {
        println!(
            "sweep pdl {} threads {} blocks/SM {} split-K {}: {:.1} tok/s",
            s.pdl, s.threads, s.blocks_per_sm, s.split_k, s.tok_s
        );
    }
}
