//! What the UI and the engine thread say to each other: plain `Send` data, no tensors.
//!
//! The UI sends [`Command`]s over a std channel; the engine answers with [`EngineEvent`]s through
//! a sink. Every generation carries a request id ([`ReqId`]) so the UI can drop events of a request
//! it no longer waits for, and a [`CancelFlag`] that the engine checks between tokens. Big payloads
//! are boxed so the enums stay small.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::generate::{GenStats, StopReason};
use crate::sampling::SamplingParams;
use crate::sinkhorn::Variant;

/// Identifies one generation request.
pub type ReqId = u64;

/// A cancel switch shared by the UI and the engine for one request.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// The flag itself, for [`crate::generate::generate`].
    pub fn as_atomic(&self) -> &AtomicBool {
        &self.0
    }
}

/// Where the model comes from: the global `--model/--revision/--tokenizer/--device/--dtype/--adapter`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSpec {
    pub model: Option<String>,
    pub revision: Option<String>,
    pub tokenizer: Option<PathBuf>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    /// `--adapter DIR`: a fine-tuned adapter put on the model once it is loaded.
    pub adapter: Option<PathBuf>,
    /// `--quant`: weight-only quantisation applied once the model (and adapter) is loaded.
    pub quant: Option<crate::quant::QuantSpec>,
}

/// How the engine runs every model it loads: the command line's kernel switches and the hub
/// settings (plain data, read once at the edge).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOpts {
    pub kernels: crate::model::Kernels,
    /// The hub settings for loading hub ids and listing the hub cache (read from the environment
    /// at the edge); `None`: local folders, the embedded model and random shapes only.
    pub hub: Option<crate::hub::HubEnv>,
}

/// UI → engine.
#[derive(Debug, Clone)]
pub enum Command {
    /// A new user message; the engine answers it as the assistant.
    Chat {
        id: ReqId,
        text: String,
        params: SamplingParams,
        cancel: CancelFlag,
    },
    /// Throw away the last answer and sample it again from the state saved before it.
    Regenerate {
        id: ReqId,
        params: SamplingParams,
        cancel: CancelFlag,
    },
    /// Remove the last turn (question and answer) and restore the state before it.
    Undo,
    /// Start over with an empty state (and an optional system message for the first turn).
    NewChat { system: Option<String> },
    /// Run both Sinkhorn variants over the router logits of the last `window` tokens.
    Sinkhorn { window: usize, max_iters: usize, tol: f64 },
    /// Write the conversation (with one state snapshot per turn) as JSON.
    SaveChat(PathBuf),
    /// Read a conversation written by `SaveChat`.
    LoadChat(PathBuf),
    /// Drive the fine-tuning trainer.
    Finetune(FinetuneCommand),
    /// List the models that can be loaded (answered by [`EngineEvent::Models`]).
    ListModels,
    /// Load another model in place of the current one (the model picker). The old model serves
    /// until the new one is ready; success starts a new chat ([`EngineEvent::Loaded`]), failure
    /// keeps the old model ([`EngineEvent::LoadFailed`]).
    Load(LoadSpec),
    /// Run `text` (blank: a built-in paragraph) through the chat's model and the one `with` names
    /// and set their routes side by side (answered by [`EngineEvent::Compare`]).
    Compare { text: String, with: CompareWith },
    /// Stop the engine thread.
    Shutdown,
}

/// Model B of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum CompareWith {
    /// Another model (the picker's choice), loaded for the comparison only.
    Model(LoadSpec),
    /// The chat's model in another weight format: quantised (`Some`), or dense as loaded (`None`,
    /// for a model that runs quantised).
    Format(Option<crate::quant::QuantSpec>),
}

/// Fine-tuning commands.
#[derive(Debug, Clone, PartialEq)]
pub enum FinetuneCommand {
    Start(Box<FinetuneSpec>),
    Pause,
    Resume,
    Stop,
    /// Write the adapter (to the spec's output folder).
    Save,
    /// Chat with the fine-tuned weights (`true`) or the base weights (`false`).
    UseFinetuned(bool),
}

/// How to fine-tune: the form of the fine-tune panel, as plain data. Mirrors the trainer's
/// `FinetuneConfig`; the engine converts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSpec {
    pub data: PathBuf,
    pub method: FinetuneMethod,
    /// LoRA targets: `in_proj`, `x_proj`, `dt_proj`, `out_proj`, `experts` (or `fc1`/`fc2`),
    /// `router` (also train the routers), or `all`.
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub lr: f64,
    pub steps: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub out: PathBuf,
}

/// What fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneMethod {
    Lora,
    Router,
    Full,
}

impl FinetuneMethod {
    pub const ALL: [Self; 3] = [Self::Lora, Self::Router, Self::Full];
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Router => "router",
            Self::Full => "full",
        }
    }
}

/// Engine → UI.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Loading goes on: stage `done` of `total`.
    LoadProgress { stage: String, done: usize, total: usize },
    /// The model is ready (at start, or after [`Command::Load`]: a new chat on it).
    Loaded(Box<ModelInfo>),
    /// [`Command::Load`] failed; the previous model is still loaded.
    LoadFailed(String),
    /// The models that can be loaded (answer to [`Command::ListModels`]).
    Models(Box<crate::catalog::Catalog>),
    /// The engine starts answering `user` (a new turn, or the same turn again on regenerate).
    TurnStarted { id: ReqId, user: String },
    /// Telemetry of prompt tokens just read (prefill).
    Prompt { id: ReqId, tokens: Vec<TokenRec> },
    /// A generated token: `text` is the newly completed text (may be empty).
    Token { id: ReqId, text: String, rec: Box<TokenRec> },
    /// Text that was held back until the end (an incomplete character or partial stop string).
    Tail { id: ReqId, text: String },
    /// The generation ended.
    Done { id: ReqId, stats: GenStats, stop: StopReason },
    /// The conversation was cut back: `turns` turns remain and telemetry from `pos` on is gone.
    Rewound { pos: usize, turns: usize },
    /// A whole conversation was loaded (replaces the current one; telemetry starts empty).
    Conversation(Box<ConversationInfo>),
    /// Sinkhorn over a window of router logits (chat) or over a training batch.
    Sinkhorn(Box<SinkhornReport>),
    /// Fine-tuning news.
    Finetune(FinetuneEvent),
    /// Two models' routes over one text (answer to [`Command::Compare`]).
    Compare(Box<crate::engine::compare::CompareReport>),
    /// Something worth a line in the status area (e.g. "saved chat.json").
    Notice(String),
    /// A request failed; the engine keeps running.
    Error { id: Option<ReqId>, message: String },
    /// The engine thread stopped for good (a panic, or the model could not be loaded).
    Fatal(String),
}

/// What the UI shows about the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub label: String,
    /// Random weights: the UI shows an "untrained demo weights" banner.
    pub untrained: bool,
    /// "cpu" or "cuda".
    pub device: String,
    pub is_gpu: bool,
    /// "f32", "bf16" or "f16".
    pub dtype: String,
    pub n_layers: usize,
    /// (half-block index, experts) per MoE layer.
    pub moe_layers: Vec<(usize, usize)>,
    /// Half-block index per Mamba layer.
    pub mamba_layers: Vec<usize>,
    pub d_model: usize,
    pub d_state: usize,
    pub vocab: usize,
    pub params_total: usize,
    pub params_active: usize,
    /// Bytes of weights read per decoded token (active params × dtype size).
    pub bytes_per_token: f64,
    pub load_secs: f64,
    /// Whether this build can fine-tune.
    pub finetune_available: bool,
    /// The weight format when quantised (`int8`, `fp8`, `q4g64`, `q4g128`); `None`: dense.
    pub quant: Option<String>,
    /// What the loader says the user should know (e.g. a checkpoint read without its conversion,
    /// and why), one line each.
    pub notes: Vec<String>,
}

/// The routing of one token in one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub expert: u16,
    /// σ(router logit) of the chosen expert.
    pub prob: f32,
}

/// One token as the model read it, with its telemetry (empty vectors when there is none, e.g.
/// for the last token of an answer, which is sampled but not fed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenRec {
    /// Position in the conversation (0 = first token ever fed).
    pub pos: usize,
    pub id: u32,
    /// The token's own text for axis labels (sanitised by the UI).
    pub piece: String,
    pub generated: bool,
    /// One per MoE layer: the first (most probable) expert.
    pub routes: Vec<Route>,
    /// One per MoE layer of a top-k model (k > 1): the other chosen experts, best first, with
    /// their router probabilities; empty for BlackMamba's top-1.
    pub more: Vec<Vec<(u16, f32)>>,
    /// One per Mamba layer: ‖h‖, ‖conv state‖, mean Δ after this token.
    pub ssm_norm: Vec<f32>,
    pub conv_norm: Vec<f32>,
    pub mean_delta: Vec<f32>,
}

/// A loaded conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationInfo {
    pub system: Option<String>,
    /// (user, assistant) per turn.
    pub turns: Vec<(String, String)>,
    pub pos: usize,
}

/// Where a Sinkhorn report comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkhornOrigin {
    /// The last `window` tokens of the chat.
    Chat,
    /// The batch that routed fine-tuning step `step`.
    Finetune { step: usize },
}

/// Sinkhorn per MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkhornReport {
    pub origin: SinkhornOrigin,
    /// Tokens asked for (chat) and tokens actually used.
    pub window: usize,
    pub n_tokens: usize,
    pub layers: Vec<SinkhornLayer>,
}

/// Sinkhorn of one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkhornLayer {
    pub layer: usize,
    pub n_experts: usize,
    /// Tokens per expert under greedy top-1.
    pub greedy_loads: Vec<usize>,
    /// One run per variant (chat: Zyphra then Standard; fine-tuning: the trainer's).
    pub runs: Vec<SinkhornRun>,
}

/// One Sinkhorn run, reduced to what the view draws.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkhornRun {
    pub variant: Variant,
    /// Per iteration.
    pub rel_change: Vec<f32>,
    pub row_err: Vec<f32>,
    pub col_err: Vec<f32>,
    pub converged: bool,
    /// Tokens per expert under the balanced assignment.
    pub loads: Vec<usize>,
    /// Tokens whose expert differs from greedy.
    pub changed: usize,
}

impl SinkhornRun {
    pub fn iters(&self) -> usize {
        self.rel_change.len()
    }
}

/// Fine-tuning news.
#[derive(Debug, Clone, PartialEq)]
pub enum FinetuneEvent {
    /// Running, paused, stopped, finished.
    Status(FinetuneStatus),
    /// One optimiser step.
    Progress(Box<FinetuneProgress>),
    /// The adapter was written.
    Saved(PathBuf),
    /// Chat now uses the fine-tuned (`true`) or base (`false`) weights.
    UsingFinetuned(bool),
    /// Routing of the fixed probe prompt, before (`after == false`) or after fine-tuning.
    ProbeRouting(Box<ProbeRouting>),
    /// Something went wrong outside a command (a NaN loss, a failed save at the end): the panel
    /// shows it until the next status change.
    Failed(String),
}

/// Where the trainer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinetuneStatus {
    Idle,
    Running,
    Paused,
    Stopped,
    Finished,
}

/// One optimiser step (from the trainer's `StepReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneProgress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub eval_loss: Option<f64>,
    /// Tokens per expert per MoE layer in this step.
    pub expert_load: Vec<Vec<usize>>,
    pub sinkhorn_iters: Vec<usize>,
    /// Seconds since the run started.
    pub elapsed_secs: f64,
}

/// Experts chosen for each token of the probe prompt, per MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeRouting {
    pub after: bool,
    pub pieces: Vec<String>,
    /// (layers × tokens) expert ids.
    pub experts: Vec<Vec<u16>>,
}
