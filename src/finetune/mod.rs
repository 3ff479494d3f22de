//! Fine-tuning and training: LoRA adapters, router-only and full training with Sinkhorn routing
//! (SPEC §3 "Training-time routing", §9), AdamW with warmup + cosine, clipping and accumulation,
//! checkpoints that resume exactly, and evaluation.
//!
//! The [`Trainer`] runs one optimiser step per call and reports a [`StepReport`]; the CLI draws
//! a progress bar from them and the TUI's fine-tune panel draws its charts from the same reports.
//!
//! * [`data`] — plain text and JSONL chat data (rendered with [`crate::chat_template`]) -> examples
//! * [`data_stream`] — reading data files in bounded pieces (any size, any line length)
//! * [`lora`] — which linears a method trains; adapters on and off the model
//! * [`adapter`] — `--adapter DIR` (load, apply, merge)
//! * [`optim`] — AdamW, the learning-rate schedule, gradient clipping
//! * [`loss`] — masked cross-entropy and evaluation
//! * [`checkpoint`] — atomic checkpoint files and their consistency on resume
//! * [`metrics`] — `metrics.jsonl`
//! * [`trainer`] — the loop itself
//! * [`prefs`], [`dpo`] — preference pairs and the DPO / IPO losses (`--method dpo`)
//! * [`routing_shift`] — expert shares before vs after a run (`routing_shift.json`)

pub mod adapter;
pub mod checkpoint;
pub mod data;
pub mod data_stream;
pub mod dpo;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod prefs;
pub mod recompute;
pub mod routing_shift;
pub mod trainer;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sinkhorn::{SinkhornOpts, SinkhornResult};

pub use data::DataFormat;
pub use lora::Target;
pub use metrics::StepTiming;
pub use trainer::Trainer;

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on the target linears; everything else frozen (router too, unless
    /// `train_router`).
    #[default]
    Lora,
    /// Only the routers of the MoE layers (weight and bias).
    Router,
    /// Every tensor of the model.
    Full,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Router => "router",
            Self::Full => "full",
        }
    }

    /// Parses a method name: `lora`, `router` or `full`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(Self::Lora),
            "router" => Ok(Self::Router),
            "full" => Ok(Self::Full),
            other => Err(Error::Invalid(format!(
                "--method {other}: use lora, router, full, dpo, dpo-full or dpo-router"
            ))),
        }
    }
}

/// What a run optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Next-token cross-entropy on the learned tokens of the data.
    #[default]
    Sft,
    /// Direct preference optimisation on preference pairs ([`dpo`], [`prefs`]).
    Dpo,
}

/// Parses `--method`: `lora`, `router`, `full` (fine-tuning on the data's tokens), or `dpo`,
/// `dpo-full`, `dpo-router` (preference tuning with LoRA adapters, every weight, or the routers;
/// `dpo-lora` is `dpo`).
pub fn parse_method(s: &str) -> Result<(Method, Objective)> {
    match s.strip_prefix("dpo") {
        Some("" | "-lora") => Ok((Method::Lora, Objective::Dpo)),
        Some(rest) => match rest.strip_prefix('-').map(Method::parse) {
            Some(Ok(m)) => Ok((m, Objective::Dpo)),
            _ => Err(Error::Invalid(format!(
                "--method {s}: use lora, router, full, dpo, dpo-full or dpo-router"
            ))),
        },
        None => Ok((Method::parse(s)?, Objective::Sft)),
    }
}

/// The `--method` spelling of a run: `lora`, …, `dpo`, `dpo-full`, `dpo-router`.
pub fn method_label(method: Method, objective: Objective) -> String {
    match (objective, method) {
        (Objective::Sft, m) => m.name().to_string(),
        (Objective::Dpo, Method::Lora) => "dpo".to_string(),
        (Objective::Dpo, m) => format!("dpo-{}", m.name()),
    }
}

/// Everything a run needs: plain data, so the TUI can build and show it and the checkpoint can
/// store it. Missing keys take the defaults of [`FinetuneConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Training data file.
    pub data: PathBuf,
    /// How to read it (auto: `.jsonl` / `.json` are JSONL, everything else plain text).
    pub format: DataFormat,
    pub method: Method,
    /// Linears that get LoRA adapters (method lora).
    pub targets: Vec<Target>,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA alpha; the adapter's output is scaled by alpha / rank.
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// The cosine decays to lr · min_lr_ratio.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Decoupled weight decay (not on A_log, D, norms and biases).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch (Sinkhorn balances over a micro-batch).
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Evaluate every N steps (0 = only before and after).
    pub eval_every: usize,
    /// Held-out data file; without one, `eval_fraction` of the training data is held out.
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    /// Most held-out examples to evaluate on (0 = all).
    pub eval_max: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Output folder: adapter / model, optimiser state, metrics.jsonl.
    pub out: PathBuf,
    /// Continue from the checkpoint in this folder.
    pub resume: Option<PathBuf>,
    /// Seeds the adapter init, the held-out split and the data order.
    pub seed: u64,
    /// Also train the routers with method lora.
    pub train_router: bool,
    /// The Sinkhorn that picks the experts while training.
    pub sinkhorn: SinkhornOpts,
    /// Name of the base model, stored in the adapter's JSON.
    pub base_model: String,
    /// Recompute each layer's activations in the backward pass instead of keeping them
    /// (`finetune::recompute`): memory for one layer instead of all, each layer run twice.
    pub recompute: Recompute,
    /// How a recomputed step's first pass runs.
    pub first_pass: FirstPass,
    /// What the run optimises: the data's tokens, or preference pairs (`--method dpo…`).
    pub objective: Objective,
    /// DPO's β: the reward of a response is β·(log π − log π_ref).
    pub dpo_beta: f64,
    /// The preference loss of a DPO run.
    pub dpo_loss: dpo::PrefLoss,
}

/// When the trainer recomputes activations ([`crate::finetune::recompute`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// On CUDA (where memory is scarce), not on the CPU.
    #[default]
    Auto,
    On,
    Off,
}

impl Recompute {
    /// Parses `--recompute`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(Error::Invalid(format!("--recompute {other}: use auto, on or off"))),
        }
    }

    /// Whether a model on `dev` recomputes.
    pub fn applies(self, dev: &candle_core::Device) -> bool {
        match self {
            Self::Auto => dev.is_cuda(),
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// How the first pass of a recomputed step runs ([`crate::finetune::recompute`]): it only makes
/// the layer boundaries and the routing decisions, which nothing differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FirstPass {
    /// The fused inference kernels where the model runs them (CUDA), else the tensor ops.
    #[default]
    Kernels,
    /// The differentiable tensor ops of pass 2 (the twin; `bench --finetune --first-pass ops`).
    Ops,
}

impl FirstPass {
    /// Parses `--first-pass`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "kernels" => Ok(Self::Kernels),
            "ops" => Ok(Self::Ops),
            other => Err(Error::Invalid(format!("--first-pass {other}: use kernels or ops"))),
        }
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            format: DataFormat::Auto,
            method: Method::Lora,
            targets: Target::ALL.to_vec(),
            rank: 16,
            alpha: 32.0,
            lr: 1e-4,
            min_lr_ratio: 0.1,
            warmup: 10,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: 1.0,
            steps: 100,
            seq_len: 256,
            batch: 4,
            grad_accum: 1,
            eval_every: 0,
            eval_data: None,
            eval_fraction: 0.05,
            eval_max: 256,
            save_every: 0,
            out: PathBuf::from("finetune-out"),
            resume: None,
            seed: 0,
            train_router: false,
            sinkhorn: SinkhornOpts::default(),
            base_model: String::new(),
            recompute: Recompute::Auto,
            first_pass: FirstPass::Kernels,
            objective: Objective::Sft,
            dpo_beta: 0.1,
            dpo_loss: dpo::PrefLoss::Sigmoid,
        }
    }
}

impl FinetuneConfig {
    /// The `--method` spelling of this run ([`method_label`]).
    pub fn method_label(&self) -> String {
        method_label(self.method, self.objective)
    }

    /// Checks the numbers before any work starts; each error names the setting and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.data.as_os_str().is_empty() {
            return Err(Error::Invalid("--data: give a training data file".into()));
        }
        self.validate_settings()
    }

    /// [`FinetuneConfig::validate`] without the data file (for runs on examples in memory).
    pub fn validate_settings(&self) -> Result<()> {
        let bad = |what: &str, why: &str| Err(Error::Invalid(format!("{what}: {why}")));
        if self.steps == 0 {
            return bad("--steps", "must be at least 1");
        }
        if self.seq_len < 2 {
            return bad("--seq-len", "must be at least 2 (one input and one target token)");
        }
        if self.batch == 0 || self.grad_accum == 0 {
            return bad("--batch / --grad-accum", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", "must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be between 0 and 1");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay", "must be 0 or more");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1 / beta2", "must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", "must be a positive number");
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return bad("--clip", "must be 0 (off) or a positive number");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("--eval-fraction", "must be in [0, 1)");
        }
        if self.method == Method::Lora {
            if self.rank == 0 {
                return bad("--rank", "must be at least 1");
            }
            if !(self.alpha.is_finite() && self.alpha > 0.0) {
                return bad("--alpha", "must be a positive number");
            }
            if self.targets.is_empty() && !self.train_router {
                return bad("--targets", "name at least one of in_proj, x_proj, dt_proj, out_proj, experts");
            }
        }
        if self.objective == Objective::Dpo && !(self.dpo_beta.is_finite() && self.dpo_beta > 0.0) {
            return bad("--beta", "must be a positive number (0.1 is usual)");
        }
        if self.sinkhorn.max_iters == 0 {
            return bad("sinkhorn.max_iters", "must be at least 1");
        }
        Ok(())
    }
}

/// What one optimiser step did: the progress event of the CLI bar and of the TUI panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps done so far (1 after the first step).
    pub step: usize,
    pub total_steps: usize,
    /// Mean cross-entropy per target token over the step's micro-batches (DPO: the mean
    /// preference loss over the step's pairs).
    pub loss: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens (padding excluded) per second of this step.
    pub tokens_per_s: f64,
    /// Held-out loss, when this step evaluated.
    pub eval_loss: Option<f64>,
    /// Tokens per expert, per MoE layer, summed over the step's micro-batches.
    pub expert_load: Vec<Vec<usize>>,
    /// Sinkhorn iterations per MoE layer (last micro-batch).
    pub sinkhorn_iters: Vec<usize>,
    /// The Sinkhorn runs of the last micro-batch, per MoE layer.
    pub sinkhorn: Vec<SinkhornResult>,
    /// The greedy top-1 expert of each token of the last micro-batch, per MoE layer: the routing
    /// Sinkhorn replaced (the TUI's Sinkhorn view compares the two).
    #[serde(default)]
    pub greedy: Vec<Vec<u32>>,
    /// The rewards of a DPO step (None for other objectives).
    #[serde(default)]
    pub pref: Option<dpo::PrefStats>,
}
