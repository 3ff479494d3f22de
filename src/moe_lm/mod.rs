//! Transformer mixture-of-experts families beside BlackMamba (issue 19): OLMoE
//! (`allenai/OLMoE-1B-7B-0924`: 64 experts, top-8, QK-norm) and Mixtral
//! (`mistralai/Mixtral-8x7B-v0.1`: 8 experts, top-2, sliding window where configured), written
//! against the Hugging Face checkpoints' layout and checked against transformers' outputs
//! (`scripts/moe_fixtures.py`, `tests/moe_lm.rs`).
//!
//! - [`config`]: `config.json` → [`MoeConfig`] (the family from `model_type`).
//! - [`weights`]: safetensors folders (single file or sharded), random weights for tests.
//! - [`attention`]: RoPE, grouped-query attention, QK-norm, sliding window, per-layer KV cache.
//! - [`moe`]: softmax router in f32, top-k, SwiGLU experts over their tokens, [`Routing`].
//! - [`model`]: [`MoeLm`] with [`KvCache`]; `forward` over a run, `step` for one token, a
//!   [`LayerProbe`] per layer (experts, probabilities, entropy, KV-cache size).
//! - [`decode`]: prompt + cached one-token steps with [`crate::sampling::Sampler`].

pub mod attention;
pub mod config;
pub mod decode;
pub mod model;
pub mod moe;
pub mod weights;

pub use config::{Family, MoeConfig};
pub use model::{KvCache, LayerProbe, MoeLm};
pub use moe::Routing;
