//! Which backend runs each family of the model's math: the fused kernels (`crate::ops` on CUDA,
//! the fused scan op on the CPU) or their tensor-op twins. Parsed once at the edge (the command
//! line's `--no-kernels`, `--slow-*` flags and their `BLACKMAMBA_*` variables) and handed to
//! the model; nothing below the command line reads the environment. Every switch exists to A/B
//! a kernel against its twin; the defaults are the fast path.

/// The model's choice of kernels, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// The fused kernels at all. Off, the GPU runs the CPU's tensor-op path (and fine-tuning on
    /// the CPU the tensor-op scan): the twin of every kernel below.
    pub enabled: bool,
    /// Prefill: every expert's products as one batched cuBLAS call per layer product (off: one
    /// product pair per expert).
    pub batched_experts: bool,
    /// Fine-tuning: the blocks' RMSNorm as one fused autograd op.
    pub rms_norm: bool,
    /// Fine-tuning: the loss's cross-entropy fused over the head's logits in their dtype.
    pub xent: bool,
    /// Fine-tuning: Mamba half-blocks differentiated by hand (`runtime::grad::mamba_block`).
    pub mamba_grad: bool,
    /// Fine-tuning: MoE half-blocks differentiated by hand (`runtime::grad::moe_block`).
    pub moe_grad: bool,
    /// Batch-1 decode (`generate`, the chat) on the graph-captured decoder of `runtime::decode`
    /// (off: one [`crate::model::Model::step`] per token, the decoder's twin).
    pub decoder: bool,
    /// The decoder samples the next token on the device (`ops::sample`); off (`--host-sampler`),
    /// its logits are copied to the host and sampled there (the device sampler's twin). On by
    /// default since its parity tests passed on an H100 (session 8).
    pub sampler: bool,
    /// Batch-1 decode as one persistent megakernel launch per token
    /// (`runtime::megakernel::cuda`) instead of the graph-captured decoder. Opt-in
    /// (`--megakernel`) until its GPU parity test has run; logits go to the host sampler.
    pub megakernel: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Self {
            enabled: true,
            batched_experts: true,
            rms_norm: true,
            xent: true,
            mamba_grad: true,
            moe_grad: true,
            decoder: true,
            sampler: true,
            megakernel: false,
        }
    }
}

impl Kernels {
    /// Every family on its tensor-op twin.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Whether a family's kernel runs: the kernels are on and so is the family.
    pub fn on(&self, family: bool) -> bool {
        self.enabled && family
    }
}
