//! `blackmamba bench --finetune`: the speed and GPU memory of the real training step.
//!
//! A [`Trainer`] is set up in memory (no files) on random token windows of `seq_len + 1` tokens
//! with the loss on every position, as plain-text fine-tuning does, and runs the step users run:
//! forward on the differentiable path with Sinkhorn routing over the micro-batch, masked
//! cross-entropy, backward (through the fused scan op where [`Model::trains_with_fused_scan`]),
//! gradient norm and clipping, the AdamW update of the f32 masters and the recast of bf16
//! weights. After `warmup` untimed steps, `steps` steps are timed one by one (each step ends with
//! values the host reads: the loss and the gradient norm, so the device is done when it returns).
//! Tokens per second = batch · seq_len / the median step time.
//!
//! Each step's forward + backward time (up to the host's read of the loss, which waits for the
//! device; no optimiser) gives a second rate, `fwd_bwd_tok_s`, comparable with forward+backward
//! throughputs such as Zyphra's.
//!
//! With `profile`, a few more steps wait for the device between forward, backward and update and
//! report where the time goes; then as many again run with the fine profilers on (the training
//! forward by part, the backward by op: [`super::finetune_profile`]). On CUDA the device memory
//! in use (all processes, as the driver reports it) is sampled every millisecond by a second
//! thread during the steps; its maximum is the peak. On the CPU (Linux) the process's resident memory is reported instead, its peak
//! being the kernel's high-water mark, reset before the steps.

use serde::Serialize;
use tokenizers::Tokenizer;

use super::finetune_profile::{self, FineProfile};
use crate::error::{Error, Result};
use crate::finetune::data::Example;
use crate::finetune::{FinetuneConfig, FirstPass, Method, Recompute, StepTiming, Target, Trainer};
use crate::model::Model;
use crate::rng::Rng;

/// What to measure.
#[derive(Debug, Clone)]
pub struct FinetuneBenchOpts {
    pub method: Method,
    pub targets: Vec<Target>,
    pub rank: usize,
    pub alpha: f64,
    pub train_router: bool,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per step (one micro-batch: Sinkhorn balances over all of it).
    pub batch: usize,
    /// Untimed steps first (kernel modules, cuBLAS handles, the allocator's pool).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Also time phases of a few extra steps, waiting for the device between them.
    pub profile: bool,
    pub seed: u64,
    /// Recompute activations in the backward pass (see [`crate::finetune::recompute`]).
    pub recompute: Recompute,
    /// How a recomputed step's first pass runs.
    pub first_pass: FirstPass,
}

impl Default for FinetuneBenchOpts {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            targets: Target::ALL.to_vec(),
            rank: 16,
            alpha: 32.0,
            train_router: false,
            seq_len: 2048,
            batch: 8,
            warmup: 2,
            steps: 5,
            profile: false,
            recompute: Recompute::Auto,
            first_pass: FirstPass::Kernels,
            seed: 0,
        }
    }
}

/// Phase times of the profiled steps (medians), milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseProfile {
    pub steps: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optim_ms: f64,
    pub total_ms: f64,
    /// Finer parts (ms, medians): the recomputed backward by layer kind (when recomputing) and
    /// the update's gradient norm, AdamW and bf16 recast.
    pub parts: Vec<(String, f64)>,
}

/// Memory during the run, MiB: on CUDA in use on the device (all processes), on the CPU the
/// process's resident set.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TrainMemory {
    /// "gpu" or "host".
    pub kind: String,
    pub after_load_mib: f64,
    /// After the trainer made its trainable tensors and optimiser state.
    pub after_setup_mib: f64,
    /// Highest sample during the warm-up and timed steps (GPU); the resident high-water mark
    /// since just before the steps (host).
    pub peak_mib: f64,
}

/// The process's resident memory now and its high-water mark, MiB (Linux; None elsewhere).
fn host_rss_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the resident high-water mark to the current resident size (Linux); false if it could not.
fn reset_host_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The report of `bench --finetune`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneBenchReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub method: String,
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub train_router: bool,
    pub seq_len: usize,
    pub batch: usize,
    pub tokens_per_step: usize,
    pub params_total: usize,
    pub params_trainable: usize,
    /// Which scan the training forward and backward ran.
    pub scan: String,
    /// Whether activations were recomputed layer by layer in the backward pass.
    pub recompute: bool,
    /// Seconds of each timed step.
    pub step_secs: Vec<f64>,
    pub secs_median: f64,
    /// tokens_per_step / secs_median.
    pub tok_s: f64,
    /// tokens_per_step · steps / their total time.
    pub tok_s_mean: f64,
    /// Seconds of forward + backward in each timed step (no optimiser; up to the loss read).
    pub fwd_bwd_secs: Vec<f64>,
    pub fwd_bwd_secs_median: f64,
    /// tokens_per_step / fwd_bwd_secs_median: forward+backward throughput, no optimiser.
    pub fwd_bwd_tok_s: f64,
    /// The training loss of each step, warm-up included (random tokens: about ln(vocab) at first).
    pub losses: Vec<f64>,
    pub profile: Option<PhaseProfile>,
    /// With `profile`: the training forward by part and the backward by op.
    pub fine_profile: Option<FineProfile>,
    pub memory: Option<TrainMemory>,
}

/// `n` random windows of `seq_len + 1` ids below `vocab`, every position learned.
pub fn random_examples(n: usize, seq_len: usize, vocab: usize, seed: u64) -> Vec<Example> {
    let mut r = Rng::new(seed ^ 0xF7BE_4C11);
    (0..n)
        .map(|_| Example {
            ids: (0..=seq_len).map(|_| r.below(vocab) as u32).collect(),
            mask: vec![true; seq_len + 1],
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Checks the options; each error names the flag and the fix.
fn validate(o: &FinetuneBenchOpts) -> Result<()> {
    if o.steps == 0 {
        return Err(Error::Invalid("--steps: time at least 1 training step".into()));
    }
    if o.seq_len < 2 {
        return Err(Error::Invalid("--seq-len: must be at least 2 for a training step".into()));
    }
    if o.batch == 0 {
        return Err(Error::Invalid("--batch: must be at least 1".into()));
    }
    Ok(())
}

/// Runs the training-step benchmark on a loaded model (any adapter on it is merged first).
pub fn run(model: &Model, tok: &Tokenizer, label: &str, o: &FinetuneBenchOpts) -> Result<FinetuneBenchReport> {
    validate(o)?;
    let dev = model.device.clone();
    #[cfg(feature = "cuda")]
    let after_load = if dev.is_cuda() { Some(super::cuda::used_mib(&dev)?) } else { None };
    let host_after_load = if dev.is_cpu() { host_rss_mib() } else { None };
    let profile_steps = if o.profile { o.steps.min(3) } else { 0 };
    // the phase profile's steps, then as many with the fine profilers
    let total = o.warmup + o.steps + 2 * profile_steps;
    let cfg = FinetuneConfig {
        method: o.method,
        targets: o.targets.clone(),
        rank: o.rank,
        alpha: o.alpha,
        train_router: o.train_router,
        steps: total,
        seq_len: o.seq_len,
        batch: o.batch,
        seed: o.seed,
        base_model: label.to_string(),
        recompute: o.recompute,
        first_pass: o.first_pass,
        ..FinetuneConfig::default()
    };
    let vocab = model.cfg.vocab_size.min(50277);
    let data = random_examples(o.batch * 4, o.seq_len, vocab, o.seed);
    let mut tr = Trainer::in_memory(model, tok, cfg, data)?;
    let mut memory = match host_after_load {
        Some((after_load_mib, _)) if reset_host_peak() => host_rss_mib().map(|(now, _)| TrainMemory {
            kind: "host".into(),
            after_load_mib,
            after_setup_mib: now,
            peak_mib: 0.0,
        }),
        _ => None,
    };
    #[cfg(feature = "cuda")]
    if let Some(after_load_mib) = after_load {
        memory = Some(TrainMemory {
            kind: "gpu".into(),
            after_load_mib,
            after_setup_mib: super::cuda::used_mib(&dev)?,
            peak_mib: 0.0,
        });
    }
    #[cfg(feature = "cuda")]
    let sampler = if dev.is_cuda() {
        Some(super::cuda::MemSampler::start(&dev)?)
    } else {
        None
    };

    let mut losses = Vec::with_capacity(total);
    for _ in 0..o.warmup {
        losses.push(tr.step()?.loss);
    }
    let mut step_secs = Vec::with_capacity(o.steps);
    let mut fwd_bwd_secs = Vec::with_capacity(o.steps);
    for _ in 0..o.steps {
        let r = tr.step()?;
        losses.push(r.loss);
        step_secs.push(tr.last_timing().total_s);
        fwd_bwd_secs.push(tr.last_timing().fwd_bwd_s);
    }
    let profile = if profile_steps > 0 {
        tr.set_sync_timing(true);
        let mut t: Vec<StepTiming> = Vec::with_capacity(profile_steps);
        for _ in 0..profile_steps {
            losses.push(tr.step()?.loss);
            t.push(tr.last_timing());
        }
        let med = |f: fn(&StepTiming) -> f64| 1e3 * median(&t.iter().map(f).collect::<Vec<_>>());
        Some(PhaseProfile {
            steps: profile_steps,
            forward_ms: med(|x| x.forward_s),
            backward_ms: med(|x| x.backward_s),
            optim_ms: med(|x| x.optim_s),
            total_ms: med(|x| x.total_s),
            parts: [
                ("first pass", med(|x| x.layers.first_pass_s)),
                ("head+loss", med(|x| x.layers.head_s)),
                ("mamba fwd", med(|x| x.layers.mamba_fwd_s)),
                ("mamba bwd", med(|x| x.layers.mamba_bwd_s)),
                ("moe fwd", med(|x| x.layers.moe_fwd_s)),
                ("moe bwd", med(|x| x.layers.moe_bwd_s)),
                ("embedding", med(|x| x.layers.embed_s)),
                ("grad norm", med(|x| x.norm_s)),
                ("adamw", med(|x| x.adam_s)),
                ("recast", med(|x| x.cast_s)),
            ]
            .into_iter()
            .filter(|(_, ms)| *ms > 0.0)
            .map(|(n, ms)| (n.to_string(), ms))
            .collect(),
        })
    } else {
        None
    };
    let fine_profile = if profile_steps > 0 {
        tr.set_sync_timing(false);
        Some(fine_profile(&mut tr, profile_steps, &mut losses)?)
    } else {
        None
    };
    #[cfg(feature = "cuda")]
    if let (Some(s), Some(m)) = (sampler, memory.as_mut()) {
        m.peak_mib = s.stop()?.max(m.after_setup_mib);
    }
    if let Some(m) = memory.as_mut().filter(|m| m.kind == "host") {
        m.peak_mib = host_rss_mib().map_or(0.0, |(_, peak)| peak);
    }

    let tokens_per_step = o.batch * o.seq_len;
    let rate = |secs: f64| if secs > 0.0 { tokens_per_step as f64 / secs } else { 0.0 };
    let secs_median = median(&step_secs);
    let fwd_bwd_secs_median = median(&fwd_bwd_secs);
    let secs_total: f64 = step_secs.iter().sum();
    let (params_total, _) = model.cfg.param_counts();
    let mut training_view = model.clone();
    training_view.differentiable = true;
    let scan = if training_view.trains_with_kernels() {
        "CUDA scan kernels, forward and backward (the rest: candle ops and autograd)"
    } else if training_view.trains_with_fused_scan() {
        "fused CPU scan op, forward and backward (the rest: candle ops and autograd)"
    } else {
        "tensor-op scan under autograd (the kernels' slow twin)"
    };
    Ok(FinetuneBenchReport {
        model: label.to_string(),
        device: if dev.is_cuda() { "cuda".into() } else { "cpu".into() },
        dtype: super::dtype_name(model.dtype),
        method: o.method.name().into(),
        targets: if o.method == Method::Lora {
            o.targets.iter().map(|t| t.name().to_string()).collect()
        } else {
            vec![]
        },
        rank: o.rank,
        alpha: o.alpha,
        train_router: o.train_router,
        seq_len: o.seq_len,
        batch: o.batch,
        tokens_per_step,
        params_total,
        params_trainable: tr.n_trainable(),
        scan: scan.into(),
        recompute: o.recompute.applies(&dev),
        tok_s: rate(secs_median),
        tok_s_mean: if secs_total > 0.0 {
            (tokens_per_step * step_secs.len()) as f64 / secs_total
        } else {
            0.0
        },
        step_secs,
        secs_median,
        fwd_bwd_tok_s: rate(fwd_bwd_secs_median),
        fwd_bwd_secs,
        fwd_bwd_secs_median,
        losses,
        profile,
        fine_profile,
        memory,
    })
}

/// Runs `steps` steps with the fine profilers on and reads their tables (switching them off
/// again, also on an error).
fn fine_profile(tr: &mut Trainer, steps: usize, losses: &mut Vec<f64>) -> Result<FineProfile> {
    finetune_profile::enable(true);
    let mut secs = Vec::with_capacity(steps);
    let mut run = || -> Result<()> {
        for _ in 0..steps {
            losses.push(tr.step()?.loss);
            secs.push(tr.last_timing().total_s);
        }
        Ok(())
    };
    let r = run();
    let p = finetune_profile::collect(steps, 1e3 * median(&secs));
    finetune_profile::enable(false);
    r.map(|()| p)
}
