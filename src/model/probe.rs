//! Telemetry of one forward call, as plain data (no tensors): per MoE layer the router logits,
//! sigmoid probabilities and chosen expert of every token; per Mamba layer the L2 norm of the SSM
//! state and of the conv state after every token, and the mean of Δ. Off unless a `Probe` is
//! passed to the forward call, so it costs nothing when off.

use crate::sinkhorn::SinkhornResult;

/// Routing of one MoE layer over the tokens of a call (tokens batch-major).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MoeRecord {
    /// Half-block index.
    pub layer: usize,
    pub n_experts: usize,
    /// (T, E) router logits x·Wᵣᵀ + bᵣ
    pub logits: Vec<f32>,
    /// (T) chosen expert
    pub experts: Vec<u32>,
    /// Sinkhorn run that chose the experts (training-time routing only).
    pub sinkhorn: Option<SinkhornResult>,
}

impl MoeRecord {
    /// σ(logit) of token `t`, expert `e`.
    pub fn prob(&self, t: usize, e: usize) -> f32 {
        sigmoid(self.logits[t * self.n_experts + e])
    }
    /// The gate value of token `t`: σ of its chosen expert's logit.
    pub fn gate(&self, t: usize) -> f32 {
        self.prob(t, self.experts[t] as usize)
    }
}

/// Norms of one Mamba layer over the tokens of a call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MambaRecord {
    pub layer: usize,
    /// (T) ‖h_t‖ over (d_inner, N)
    pub ssm_norm: Vec<f32>,
    /// (T) ‖conv state after t‖ over (d_inner, K)
    pub conv_norm: Vec<f32>,
    /// (T) mean over d_inner of Δ_t
    pub mean_delta: Vec<f32>,
}

/// What a forward call recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probe {
    pub n_tokens: usize,
    pub moe: Vec<MoeRecord>,
    pub mamba: Vec<MambaRecord>,
    /// Record the MoE layers only (training: the Mamba norms would cost host copies).
    pub moe_only: bool,
}

impl Probe {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
