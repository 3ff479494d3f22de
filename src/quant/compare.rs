//! What quantisation does to a model's routing and predictions: the same text teacher-forced
//! through the unquantised and the quantised model, compared per MoE layer (the share of tokens
//! whose expert changes, the drift of the router's sigmoid probabilities) and overall
//! (perplexity, logits error, top-1 agreement). `blackmamba quantize --compare` prints it.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::probe::{sigmoid, Probe};
use crate::model::{Logits, Model};

/// One MoE layer's routing under quantisation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LayerDrift {
    /// Half-block index.
    pub layer: usize,
    pub tokens: usize,
    /// Tokens whose top-1 expert differs from the unquantised model's.
    pub changed: usize,
    /// Mean over tokens and experts of |σ(logit_q) − σ(logit)|.
    pub prob_drift_mean: f64,
    /// Largest |σ(logit_q) − σ(logit)| of any token and expert.
    pub prob_drift_max: f64,
    /// Mean |gate_q − gate| (the chosen expert's σ, which scales its output).
    pub gate_drift_mean: f64,
}

impl LayerDrift {
    /// The share of tokens routed to another expert.
    pub fn changed_share(&self) -> f64 {
        self.changed as f64 / self.tokens.max(1) as f64
    }
}

/// The whole comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QuantCompare {
    /// The format compared (e.g. `q4g64`).
    pub format: String,
    /// Tokens run (predictions scored: one fewer per window).
    pub tokens: usize,
    pub scored: usize,
    /// Perplexity of the unquantised and the quantised model on the text.
    pub ppl_ref: f64,
    pub ppl_quant: f64,
    /// Largest |Δ logit| and ‖Δ logits‖ / ‖logits‖ over every position.
    pub logits_max_abs: f64,
    pub logits_rel_rms: f64,
    /// Positions whose most likely next token is the same in both models.
    pub top1_agree: f64,
    pub layers: Vec<LayerDrift>,
}

/// Teacher-forces `ids` (a window, fresh state) -> logits (L, V) f32 and the probe.
fn run(model: &Model, ids: &[u32]) -> Result<(Tensor, Probe)> {
    model.check_ids(ids)?;
    let mut state = model.new_state(1)?;
    let mut probe = Probe::new();
    let t = Tensor::from_slice(ids, (1, ids.len()), &model.device)?;
    let logits = model.forward(&t, &mut state, Logits::All, Some(&mut probe))?.squeeze(0)?;
    Ok((logits.to_dtype(DType::F32)?, probe))
}

/// Sum of −log p(next token) over a window's positions but the last.
fn nll_sum(logits: &Tensor, ids: &[u32]) -> Result<f64> {
    let n = ids.len() - 1;
    let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n)?, D::Minus1)?;
    let next = Tensor::from_slice(&ids[1..], (n, 1), logits.device())?;
    Ok(-f64::from(lp.gather(&next, 1)?.sum_all()?.to_scalar::<f32>()?))
}

/// Compares `quant` with `reference` on `ids`, in windows of `window` tokens (each from a fresh
/// state). `format` names the quantisation in the report.
pub fn compare(reference: &Model, quant: &Model, ids: &[u32], window: usize, format: &str) -> Result<QuantCompare> {
    if ids.len() < 2 || window < 2 {
        return Err(Error::Invalid(format!(
            "the comparison needs at least 2 tokens and a window of 2 or more (got {} tokens, window {window})",
            ids.len()
        )));
    }
    let mut out = QuantCompare {
        format: format.to_string(),
        ..Default::default()
    };
    let (mut nll_r, mut nll_q, mut sq_d, mut sq_r, mut agree) = (0f64, 0f64, 0f64, 0f64, 0usize);
    for win in ids.chunks(window).filter(|w| w.len() >= 2) {
        let (lr, pr) = run(reference, win)?;
        let (lq, pq) = run(quant, win)?;
        nll_r += nll_sum(&lr, win)?;
        nll_q += nll_sum(&lq, win)?;
        out.scored += win.len() - 1;
        out.tokens += win.len();
        let diff = (&lq - &lr)?;
        out.logits_max_abs = out.logits_max_abs.max(f64::from(diff.abs()?.max_all()?.to_scalar::<f32>()?));
        sq_d += f64::from(diff.sqr()?.sum_all()?.to_scalar::<f32>()?);
        sq_r += f64::from(lr.sqr()?.sum_all()?.to_scalar::<f32>()?);
        let (ar, aq) = (lr.argmax(D::Minus1)?.to_vec1::<u32>()?, lq.argmax(D::Minus1)?.to_vec1::<u32>()?);
        agree += ar.iter().zip(&aq).filter(|(a, b)| a == b).count();
        add_routing(&mut out.layers, &pr, &pq)?;
    }
    for l in &mut out.layers {
        let n = l.tokens.max(1) as f64;
        l.gate_drift_mean /= n;
    }
    out.ppl_ref = (nll_r / out.scored as f64).exp();
    out.ppl_quant = (nll_q / out.scored as f64).exp();
    out.logits_rel_rms = (sq_d / sq_r.max(f64::MIN_POSITIVE)).sqrt();
    out.top1_agree = agree as f64 / out.tokens as f64;
    Ok(out)
}

/// Adds one window's routing of both models into the per-layer sums (`gate_drift_mean` holds a
/// sum until [`compare`] divides it; `prob_drift_mean` is kept as a running mean).
fn add_routing(layers: &mut Vec<LayerDrift>, r: &Probe, q: &Probe) -> Result<()> {
    if r.moe.len() != q.moe.len() {
        return Err(Error::Invalid("the two models have different MoE layers".into()));
    }
    if layers.is_empty() {
        layers.extend(r.moe.iter().map(|m| LayerDrift {
            layer: m.layer,
            ..Default::default()
        }));
    }
    for ((acc, a), b) in layers.iter_mut().zip(&r.moe).zip(&q.moe) {
        let (t, e) = (a.experts.len(), a.n_experts);
        let mut sum = 0f64;
        for (&la, &lb) in a.logits.iter().zip(&b.logits) {
            let d = f64::from((sigmoid(la) - sigmoid(lb)).abs());
            sum += d;
            acc.prob_drift_max = acc.prob_drift_max.max(d);
        }
        let cells_before = (acc.tokens * e) as f64;
        acc.prob_drift_mean = (acc.prob_drift_mean * cells_before + sum) / (cells_before + (t * e) as f64).max(1.0);
        for i in 0..t {
            acc.changed += usize::from(a.experts[i] != b.experts[i]);
            acc.gate_drift_mean += f64::from((a.gate(i) - b.gate(i)).abs());
        }
        acc.tokens += t;
    }
    Ok(())
}

impl QuantCompare {
    /// The report as a Markdown table (what `quantize --compare` prints).
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "## {} vs unquantised ({} tokens)\n\nperplexity {:.4} -> {:.4} ({:+.2}%), top-1 agreement {:.1}%, logits max |Δ| {:.4}, relative RMS {:.4}\n\n",
            self.format,
            self.tokens,
            self.ppl_ref,
            self.ppl_quant,
            (self.ppl_quant / self.ppl_ref - 1.0) * 100.0,
            self.top1_agree * 100.0,
            self.logits_max_abs,
            self.logits_rel_rms
        );
        s.push_str("| layer | tokens | expert changed | mean abs Δσ | max abs Δσ | mean abs Δ gate |\n|---|---|---|---|---|---|\n");
        for l in &self.layers {
            s.push_str(&format!(
                "| {} | {} | {} ({:.2}%) | {:.5} | {:.5} | {:.5} |\n",
                l.layer,
                l.tokens,
                l.changed,
                l.changed_share() * 100.0,
                l.prob_drift_mean,
                l.prob_drift_max,
                l.gate_drift_mean
            ));
        }
        s
    }
}
