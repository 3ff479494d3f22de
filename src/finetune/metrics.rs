//! `DIR/metrics.jsonl`: one JSON object per optimiser step (the [`StepReport`] without the
//! Sinkhorn plans), plus `{"step": N, "eval_loss": …}` lines for evaluations outside a step.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::finetune::recompute::LayerTiming;
use crate::finetune::StepReport;
use crate::model::weights::write_atomic;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub expert_load: Vec<Vec<usize>>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub sinkhorn_iters: Vec<usize>,
    /// DPO: mean reward β·(log π − log π_ref) of the chosen responses.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_chosen: Option<f64>,
    /// DPO: the same of the rejected responses.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_rejected: Option<f64>,
    /// DPO: mean chosen − rejected reward.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_margin: Option<f64>,
    /// DPO: share of pairs whose chosen reward is above the rejected one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_accuracy: Option<f64>,
    /// Seconds since the run (or its resume) started.
    pub elapsed_s: f64,
}

impl MetricsLine {
    pub fn from_report(r: &StepReport, elapsed_s: f64) -> Self {
        Self {
            step: r.step,
            loss: Some(r.loss),
            lr: Some(r.lr),
            grad_norm: Some(r.grad_norm),
            tokens_per_s: Some(r.tokens_per_s),
            eval_loss: r.eval_loss,
            expert_load: r.expert_load.clone(),
            sinkhorn_iters: r.sinkhorn_iters.clone(),
            reward_chosen: r.pref.map(|p| p.reward_chosen),
            reward_rejected: r.pref.map(|p| p.reward_rejected),
            reward_margin: r.pref.map(|p| p.margin),
            reward_accuracy: r.pref.map(|p| p.accuracy),
            elapsed_s,
        }
    }

    pub fn eval(step: usize, eval_loss: f64, elapsed_s: f64) -> Self {
        Self {
            step,
            loss: None,
            lr: None,
            grad_norm: None,
            tokens_per_s: None,
            eval_loss: Some(eval_loss),
            expert_load: vec![],
            sinkhorn_iters: vec![],
            reward_chosen: None,
            reward_rejected: None,
            reward_margin: None,
            reward_accuracy: None,
            elapsed_s,
        }
    }
}

/// Appends lines to `metrics.jsonl`.
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
}

impl Metrics {
    /// Starts the file in `dir`. A fresh run starts it empty; a run resumed from the checkpoint in
    /// `resumed.0` at step `resumed.1` starts with that folder's lines up to that step (lines of
    /// later steps are dropped: those steps run again).
    pub fn open(dir: &Path, resumed: Option<(&Path, usize)>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(METRICS_FILE);
        let kept = match resumed {
            Some((from, step)) if from.join(METRICS_FILE).is_file() => {
                let old = from.join(METRICS_FILE);
                let text = std::fs::read_to_string(&old).map_err(|e| Error::io(&old, e))?;
                text.lines()
                    .filter(|l| serde_json::from_str::<MetricsLine>(l).is_ok_and(|m| m.step <= step))
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            }
            _ => String::new(),
        };
        write_atomic(&path, kept.as_bytes())?;
        Ok(Self { path })
    }

    pub fn push(&mut self, line: &MetricsLine) -> Result<()> {
        let mut text = serde_json::to_string(line).map_err(|e| Error::Invalid(format!("metrics line: {e}")))?;
        text.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        f.write_all(text.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a `metrics.jsonl` (for summaries and tests).
pub fn read(path: &Path) -> Result<Vec<MetricsLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::bad_file(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// Where the last step's time went, in seconds. Without [`crate::finetune::Trainer::set_sync_timing`] the device
/// may still be working on one phase when the next starts (the host waits only where a value
/// comes back: the routing, the loss, the gradient norm), so only `total_s` is exact then.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTiming {
    /// Forward passes and loss of all micro-batches.
    pub forward_s: f64,
    /// Backward passes and gradient accumulation.
    pub backward_s: f64,
    /// Gradient norm, clipping, the AdamW update and the recast of bf16 weights.
    pub optim_s: f64,
    /// The whole step, evaluation and checkpointing excluded.
    pub total_s: f64,
    /// Forward and backward of all micro-batches (the gradients accumulated), up to the host's
    /// read of each micro-batch's loss, which waits for the device: exact without device waits
    /// of its own. No optimiser: the measure of Zyphra's forward+backward throughput.
    pub fwd_bwd_s: f64,
    /// With recomputation and device waits: the backward's parts, summed over micro-batches.
    pub layers: LayerTiming,
    /// With device waits: the update's parts (gradient norm; AdamW; recasting bf16 weights).
    pub norm_s: f64,
    pub adam_s: f64,
    pub cast_s: f64,
}
