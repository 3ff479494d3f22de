//! The probe both families share (issue 19): per MoE layer and token the top-k experts, their
//! router probabilities and mixing weights and the router's entropy; per layer the memory the
//! model carries (BlackMamba: the SSM-state norm; a transformer: the key/value-cache length).
//!
//! Probabilities are comparable across families: BlackMamba's are the softmax of its router
//! logits (its top-1 expert is their argmax), the transformers' are their softmax router's. The
//! mixing weight is what scales the expert's output: BlackMamba's sigmoid gate, the transformers'
//! probability (renormalised over the k chosen where the config says so).

use serde::{Deserialize, Serialize};

use crate::model::probe::Probe;
use crate::moe_lm::LayerProbe;

/// The routing of one MoE layer over the T tokens of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRoutes {
    /// Index of the layer in the model (BlackMamba: half-block; transformer: decoder layer).
    pub layer: usize,
    /// Experts in the layer (E).
    pub n_experts: usize,
    /// Experts per token (k).
    pub k: usize,
    /// Chosen experts (T·k), each token's in descending order of probability.
    pub experts: Vec<u32>,
    /// Router probability of each chosen expert (T·k).
    pub probs: Vec<f32>,
    /// Mixing weight of each chosen expert (T·k).
    pub weights: Vec<f32>,
    /// Entropy of each token's router distribution, in nats (T).
    pub entropy: Vec<f32>,
    /// Router scores of every expert (T·E), up to a constant per token: BlackMamba's logits, a
    /// transformer's log-probabilities (what Sinkhorn balances; the constant does not matter).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f32>,
}

impl LayerRoutes {
    /// Tokens in the run.
    pub fn tokens(&self) -> usize {
        self.entropy.len()
    }

    /// The chosen experts of token `t`, best first.
    pub fn experts_of(&self, t: usize) -> &[u32] {
        self.experts.get(t * self.k..(t + 1) * self.k).unwrap_or(&[])
    }

    /// The router probabilities of token `t`'s chosen experts.
    pub fn probs_of(&self, t: usize) -> &[f32] {
        self.probs.get(t * self.k..(t + 1) * self.k).unwrap_or(&[])
    }

    /// Appends the tokens of `other` (same layer and shape).
    pub fn extend(&mut self, other: &LayerRoutes) {
        self.experts.extend_from_slice(&other.experts);
        self.probs.extend_from_slice(&other.probs);
        self.weights.extend_from_slice(&other.weights);
        self.entropy.extend_from_slice(&other.entropy);
        self.scores.extend_from_slice(&other.scores);
    }

    /// The routes of one BlackMamba MoE layer (top-1).
    pub fn from_mamba(rec: &crate::model::probe::MoeRecord) -> Self {
        let e = rec.n_experts.max(1);
        let tokens = rec.experts.len();
        let mut out = Self {
            layer: rec.layer,
            n_experts: rec.n_experts,
            k: 1,
            ..Default::default()
        };
        for t in 0..tokens {
            let row = rec.logits.get(t * e..(t + 1) * e).unwrap_or(&[]);
            let (probs, h) = softmax_entropy(row);
            let x = rec.experts[t];
            out.experts.push(x);
            out.probs.push(probs.get(x as usize).copied().unwrap_or(0.0));
            out.weights.push(if row.is_empty() { 0.0 } else { rec.gate(t) });
            out.entropy.push(h);
        }
        out.scores = rec.logits.clone();
        out
    }

    /// The routes of one transformer MoE layer (top-k).
    pub fn from_transformer(layer: usize, p: &LayerProbe) -> Self {
        let r = &p.routing;
        Self {
            layer,
            n_experts: r.num_experts,
            k: r.top_k,
            experts: r.experts.clone(),
            probs: r.probs.clone(),
            weights: r.weights.clone(),
            entropy: r.entropy.clone(),
            scores: r.router_probs.iter().map(|&p| p.max(1e-30).ln()).collect(),
        }
    }
}

/// Softmax of a row of logits and its entropy in nats (in f64 for stability).
pub fn softmax_entropy(row: &[f32]) -> (Vec<f32>, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (vec![0.0; row.len()], 0.0);
    }
    let ex: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = ex.iter().sum();
    let p: Vec<f64> = ex.iter().map(|x| x / sum).collect();
    let h: f64 = p.iter().filter(|&&q| q > 0.0).map(|&q| -q * q.ln()).sum();
    (p.iter().map(|&q| q as f32).collect(), h as f32)
}

/// What a model carries from token to token, per layer, after a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Memory {
    /// BlackMamba: the L2 norm of a Mamba layer's SSM state after each token of the run.
    SsmNorm { layer: usize, norms: Vec<f32> },
    /// Transformer: the key/value positions a layer caches after the run.
    KvLen { layer: usize, len: usize },
}

/// One run's shared telemetry: routes per MoE layer, memory per layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedProbe {
    /// Tokens in the run.
    pub tokens: usize,
    /// The MoE layers in model order.
    pub moe: Vec<LayerRoutes>,
    /// The memory of each Mamba layer (BlackMamba) or each attention layer (transformer).
    pub memory: Vec<Memory>,
}

impl SharedProbe {
    /// From a BlackMamba probe.
    pub fn from_mamba(p: &Probe) -> Self {
        Self {
            tokens: p.n_tokens,
            moe: p.moe.iter().map(LayerRoutes::from_mamba).collect(),
            memory: p
                .mamba
                .iter()
                .map(|m| Memory::SsmNorm {
                    layer: m.layer,
                    norms: m.ssm_norm.clone(),
                })
                .collect(),
        }
    }

    /// From a transformer run's per-layer probes.
    pub fn from_transformer(layers: &[LayerProbe]) -> Self {
        Self {
            tokens: layers.first().map_or(0, |p| p.routing.tokens),
            moe: layers
                .iter()
                .enumerate()
                .map(|(i, p)| LayerRoutes::from_transformer(i, p))
                .collect(),
            memory: layers
                .iter()
                .enumerate()
                .map(|(i, p)| Memory::KvLen { layer: i, len: p.kv_len })
                .collect(),
        }
    }

    /// The total key/value positions cached over all layers (0 for BlackMamba).
    pub fn kv_positions(&self) -> usize {
        self.memory
            .iter()
            .map(|m| match m {
                Memory::KvLen { len, .. } => *len,
                Memory::SsmNorm { .. } => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::probe::MoeRecord;

    #[test]
    fn blackmamba_routes_take_the_softmax_of_the_logits_and_the_sigmoid_gate() {
        let rec = MoeRecord {
            layer: 3,
            n_experts: 2,
            logits: vec![0.0, 0.0, 2.0, -1.0],
            experts: vec![1, 0],
            sinkhorn: None,
        };
        let r = LayerRoutes::from_mamba(&rec);
        assert_eq!((r.layer, r.k, r.tokens()), (3, 1, 2));
        assert!((r.probs[0] - 0.5).abs() < 1e-6);
        assert!((r.entropy[0] - 2f32.ln()).abs() < 1e-6);
        let p2 = 1.0 / (1.0 + (-3f32).exp());
        assert!((r.probs[1] - p2).abs() < 1e-6, "{}", r.probs[1]);
        assert!((r.weights[1] - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
        assert!(r.entropy[1] < r.entropy[0]);
        assert_eq!(r.experts_of(1), &[0]);
    }
}
