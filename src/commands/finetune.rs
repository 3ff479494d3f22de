//! `blackmamba finetune`: LoRA, router-only or full fine-tuning, or DPO on preference pairs,
//! with a progress bar; and the options and loop it shares with `blackmamba train`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::ModelArgs;
use crate::finetune::data::BadLine;
use crate::finetune::dpo::PrefLoss;
use crate::finetune::routing_shift::{routes, RoutingShift};
use crate::finetune::{parse_method, DataFormat, FinetuneConfig, Objective, Recompute, StepReport, Target, Trainer};
use crate::runtime::dist::tcp::TcpGroup;
use crate::runtime::dist::{Collective, Single, Timeouts};
use crate::signals::{Interrupted, Signal, Signals};

/// Options shared by `finetune` and `train` (unset ones take the command's defaults).
#[derive(Debug, Args, Clone)]
pub struct RunOpts {
    /// Training data: plain text, or JSONL with {"prompt","response"} / {"messages":[...]} / {"text"};
    /// with --method dpo, JSONL preference pairs {"prompt","chosen","rejected"} (strings, or
    /// lists of {"role","content"} messages).
    #[arg(long)]
    pub data: PathBuf,
    /// text or jsonl (default: by extension, .jsonl/.json are JSONL).
    #[arg(long)]
    pub format: Option<String>,
    /// Output folder (checkpoint, metrics.jsonl). Default with --resume: the resumed folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run whose checkpoint is in this folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimiser steps in total.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Decoupled weight decay (not applied to A_log, D, norms, biases).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long)]
    pub clip: Option<f64>,
    /// Tokens per training sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch (Sinkhorn balances the experts over a micro-batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Evaluate on held-out data every N steps (0 = before and after only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Held-out data file (default: hold out --eval-fraction of --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of --data held out when no --eval-data is given.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Most held-out examples to evaluate (0 = all).
    #[arg(long)]
    pub eval_max: Option<usize>,
    /// Save a checkpoint every N steps (0 = at the end only).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Seed of the adapter init, the held-out split and the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute each layer's activations in the backward pass instead of keeping them all:
    /// auto (on CUDA), on, off. Same gradients; memory for one layer; each layer runs twice.
    #[arg(long)]
    pub recompute: Option<String>,
}

impl RunOpts {
    /// Fills `cfg` (which holds the command's defaults) from the options given. With `--resume`
    /// the run's own settings (from its `trainer_state.json`) replace the defaults first, so only
    /// what is given changes.
    pub fn apply(&self, cfg: &mut FinetuneConfig) -> anyhow::Result<()> {
        if let Some(dir) = &self.resume {
            *cfg = crate::finetune::checkpoint::read_state(dir)?.config;
        }
        cfg.data = self.data.clone();
        if let Some(f) = &self.format {
            cfg.format = DataFormat::parse(f)?;
        }
        cfg.resume = self.resume.clone();
        cfg.out = match (&self.out, &self.resume) {
            (Some(o), _) => o.clone(),
            (None, Some(r)) => r.clone(),
            (None, None) => anyhow::bail!("--out: give the folder to write the checkpoint and metrics into"),
        };
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f.clone() { cfg.$f = v; })* };
        }
        set!(
            steps,
            lr,
            warmup,
            weight_decay,
            clip,
            seq_len,
            batch,
            grad_accum,
            eval_every,
            eval_fraction,
            eval_max,
            save_every,
            seed
        );
        if self.eval_data.is_some() {
            cfg.eval_data = self.eval_data.clone();
        }
        if let Some(r) = &self.recompute {
            cfg.recompute = Recompute::parse(r)?;
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub run: RunOpts,
    /// lora, router or full; or dpo (preference pairs, LoRA adapters; the reference is the base
    /// with the adapters off), dpo-full (every weight; the reference log-probs are computed once
    /// before training) or dpo-router [default: lora; with --resume, the run's].
    #[arg(long)]
    pub method: Option<String>,
    /// DPO's beta: a response's reward is beta·(log π − log π_ref) [default: 0.1; with --resume,
    /// the run's].
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO's loss: sigmoid (DPO, −log σ(beta·h)) or ipo ((h − 1/(2·beta))²) [default: sigmoid;
    /// with --resume, the run's].
    #[arg(long)]
    pub dpo_loss: Option<String>,
    /// LoRA targets, comma-separated: in_proj,x_proj,dt_proj,out_proj,experts (or all)
    /// [default: all; with --resume, the run's].
    #[arg(long)]
    pub targets: Option<String>,
    /// LoRA rank [default: 16; with --resume, the run's].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (the adapter is scaled by alpha/rank) [default: 32; with --resume, the run's].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Also train the routers with --method lora.
    #[arg(long)]
    pub train_router: bool,
    /// One rank of a data-parallel run: rank, world size and rank 0's address from the
    /// environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as torchrun sets them,
    /// or Slurm's / Open MPI's); `blackmamba launch --gpus N -- finetune ...` sets them. Each rank
    /// trains on --batch sequences of every global batch of --batch × world size.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: seconds a rank waits for the others in one exchange before it stops
    /// with an error naming the rank that did not answer.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub dist_timeout: u64,
}

pub fn run(m: &ModelArgs, a: &FinetuneArgs) -> anyhow::Result<()> {
    let mut cfg = FinetuneConfig::default();
    a.run.apply(&mut cfg)?;
    if let Some(m) = &a.method {
        (cfg.method, cfg.objective) = parse_method(m)?;
    }
    if let Some(b) = a.beta {
        cfg.dpo_beta = b;
    }
    if let Some(l) = &a.dpo_loss {
        cfg.dpo_loss = PrefLoss::parse(l)?;
    }
    if cfg.objective != Objective::Dpo && (a.beta.is_some() || a.dpo_loss.is_some()) {
        anyhow::bail!("--beta and --dpo-loss: only with --method dpo, dpo-full or dpo-router");
    }
    if let Some(t) = &a.targets {
        cfg.targets = Target::parse_list(t)?;
    }
    if let Some(r) = a.rank {
        cfg.rank = r;
    }
    if let Some(al) = a.alpha {
        cfg.alpha = al;
    }
    cfg.train_router |= a.train_router;
    let mut m = resume_base(m, a.run.resume.as_deref());
    let group: Box<dyn Collective> = if a.distributed {
        let env = super::environment::dist_env()?;
        // the rank's GPU: its place on this host
        m.gpu = env.local_rank;
        let t = Timeouts {
            op: Duration::from_secs(a.dist_timeout.max(1)),
            ..Timeouts::default()
        };
        let g = TcpGroup::join(&env, t).with_context(|| format!("joining the run as rank {} of {}", env.rank, env.world_size))?;
        Box::new(g)
    } else {
        Box::new(Single)
    };
    let loaded = super::load(&m)?;
    if loaded.untrained && group.rank() == 0 {
        eprintln!("note: {} has untrained random weights", loaded.label);
    }
    cfg.base_model = loaded.label.clone();
    drive_in(&loaded.model, &loaded.tokenizer, cfg, group)
}

/// With `--resume DIR` and no `--model` (a config file's `model` default does not count): the base
/// model the run was trained on, as recorded in `DIR/adapter.json` (a folder, hub id or random
/// shape; "embedded" is the default anyway). Otherwise (or when DIR has no readable record: the
/// trainer reports that) the arguments as given.
pub fn resume_base(m: &ModelArgs, resume: Option<&std::path::Path>) -> ModelArgs {
    let mut m = m.clone();
    let given = m.model.is_some() && !m.model_from_config;
    if let (false, Some(dir)) = (given, resume) {
        if let Ok(meta) = crate::finetune::adapter::AdapterMeta::read(dir) {
            if meta.base_model == "embedded" {
                m.model = None;
            } else {
                eprintln!("resuming on {} (the base model recorded in {})", meta.base_model, dir.display());
                m.model = Some(meta.base_model);
            }
        }
    }
    m
}

/// Runs a trainer to the end with a progress bar: eval before and after; a non-finite loss stops
/// without saving. SIGINT, SIGTERM or SIGHUP stop it after the current step: it saves a checkpoint
/// (atomically: every file is renamed into place once complete) and returns [`Interrupted`], so
/// the process ends with 130, 143 or 129. A second signal during a step ends the process at once.
pub fn drive(base: &crate::model::Model, tok: &tokenizers::Tokenizer, cfg: FinetuneConfig) -> anyhow::Result<()> {
    drive_in(base, tok, cfg, Box::new(Single))
}

/// [`drive`] as one rank of a data-parallel run (see [`Trainer::new_in`]): rank 0 reports and
/// saves, the others train quietly; a signal to any rank stops every rank after the same step.
pub fn drive_in(
    base: &crate::model::Model,
    tok: &tokenizers::Tokenizer,
    cfg: FinetuneConfig,
    group: Box<dyn Collective>,
) -> anyhow::Result<()> {
    let signals = Signals::install(true)?;
    let out = cfg.out.clone();
    let quiet = group.rank() != 0;
    let say = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let mut t = Trainer::new_in(base, tok, cfg, group).context("setting up the run")?;
    let c = t.config().clone();
    let (n_train, n_eval) = t.data_sizes();
    if !quiet {
        report_bad("data", &c.data, &t.bad_lines);
        if let Some(e) = &c.eval_data {
            report_bad("eval data", e, &t.eval_bad_lines);
        }
    }
    let unit = match c.objective {
        Objective::Dpo => "pairs",
        Objective::Sft => "examples",
    };
    say(format!(
        "{} on {}: {} trainable values; {n_train} training and {n_eval} held-out {unit}; {} steps of {}×{} {} of ≤{} tokens{}",
        c.method_label(),
        c.base_model,
        t.n_trainable(),
        c.steps,
        c.grad_accum,
        c.batch,
        if c.objective == Objective::Dpo { "pairs" } else { "sequences" },
        c.seq_len,
        if t.steps_done() > 0 {
            format!("; resuming at step {}", t.steps_done())
        } else {
            String::new()
        }
    ));
    // the base model's routing of the comparison slice (rank 0 writes the comparison)
    let slice = t.routing_slice();
    let routes_before = if quiet { None } else { Some(routes(base, &slice.1, c.batch)?) }.filter(|r| !r.is_empty());
    let before = t.eval()?;
    if let Some(e) = before {
        say(format!(
            "eval before: loss {:.4}, perplexity {:.2} ({} tokens)",
            e.loss, e.perplexity, e.tokens
        ));
        t.log_eval(e.loss)?;
    }
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(c.steps as u64).with_position(t.steps_done() as u64)
    };
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.enable_steady_tick(Duration::from_millis(500));
    let every = (c.steps / 20).max(1);
    let mut last: Option<StepReport> = None;
    while !t.done() {
        // every rank stops after the same step: a signal seen by any rank stops them all
        let mine = signals.received();
        if let Some(sig) = t.any_rank(mine.is_some())?.then(|| mine.unwrap_or(Signal::Terminate)) {
            pb.abandon();
            t.save().context("saving the checkpoint after the signal")?;
            say(format!(
                "{} at step {}: checkpoint saved to {}; continue with --resume {}",
                sig.name(),
                t.steps_done(),
                out.display(),
                out.display()
            ));
            return Err(Interrupted(sig).into());
        }
        let r = match t.step() {
            Ok(r) => r,
            Err(e) => {
                pb.abandon();
                return Err(e.into());
            }
        };
        let msg = format!(
            "loss {:.4}{} lr {:.2e} |g| {:.3} {:.0} tok/s{}",
            r.loss,
            pref_summary(&r),
            r.lr,
            r.grad_norm,
            r.tokens_per_s,
            routing_summary(&r)
        );
        if let Some(ev) = r.eval_loss {
            let line = format!("step {}: eval loss {ev:.4} (perplexity {:.2})", r.step, ev.exp());
            if pb.is_hidden() {
                say(line);
            } else {
                pb.println(line);
            }
        }
        if pb.is_hidden() && (r.step % every == 0 || r.step == c.steps) {
            say(format!("step {}/{}: {msg}", r.step, c.steps));
        }
        pb.set_position(r.step as u64);
        pb.set_message(msg);
        last = Some(r);
    }
    pb.finish();
    t.save()?;
    if let Some(rb) = &routes_before {
        let ra = routes(&t.serving_view()?, &slice.1, c.batch)?;
        let shift = RoutingShift::compare(&slice.0, rb, &ra);
        shift.save(&out)?;
        say(shift.summary());
    }
    if let Some(r) = &last {
        say(format!("final training loss {:.4}", r.loss));
    }
    match (before, last.and_then(|r| r.eval_loss)) {
        (Some(b), Some(a)) => say(format!(
            "eval after: loss {a:.4}, perplexity {:.2} (before: {:.4}, {:.2})",
            a.exp(),
            b.loss,
            b.perplexity
        )),
        (None, _) => say("no held-out data: pass --eval-data or a non-zero --eval-fraction to measure it".into()),
        _ => {}
    }
    say(format!(
        "saved to {} (metrics in {})",
        out.display(),
        out.join("metrics.jsonl").display()
    ));
    Ok(())
}

/// A DPO step's rewards: chosen / rejected, margin and accuracy.
fn pref_summary(r: &StepReport) -> String {
    match &r.pref {
        Some(p) => format!(
            " rewards {:+.3}/{:+.3} margin {:+.3} acc {:.2}",
            p.reward_chosen, p.reward_rejected, p.margin, p.accuracy
        ),
        None => String::new(),
    }
}

/// The busiest expert's load over the mean (worst MoE layer) and the most Sinkhorn iterations.
fn routing_summary(r: &StepReport) -> String {
    let worst = r
        .expert_load
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mean = l.iter().sum::<usize>() as f64 / l.len() as f64;
            l.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-9)
        })
        .fold(0f64, f64::max);
    match r.sinkhorn_iters.iter().max() {
        Some(it) => format!(" experts max/mean {worst:.2} sinkhorn {it} it"),
        None => String::new(),
    }
}

/// Prints the skipped lines of a data file (the first ten, then a count).
fn report_bad(what: &str, path: &std::path::Path, bad: &[BadLine]) {
    if bad.is_empty() {
        return;
    }
    eprintln!("{what} {}: skipped {} line(s):", path.display(), bad.len());
    for b in bad.iter().take(10) {
        eprintln!("  line {}: {}", b.line, b.reason);
    }
    if bad.len() > 10 {
        eprintln!("  ... and {} more", bad.len() - 10);
    }
}
