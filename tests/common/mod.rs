//! Shared helpers of the integration tests: tiny random models and comparisons.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use blackmamba::model::config::Config;
use blackmamba::model::random::{random_weights, RandomInit};
use blackmamba::model::Model;
use candle_core::{DType, Device, Tensor};

/// A tiny config with the given layer pattern.
pub fn tiny_config(layers: &[&str], d: usize, vocab: usize) -> Config {
    let json = serde_json::json!({
        "num_layers": layers.len(), "hidden_size": d, "state_size": 8, "conv_dimension": 4,
        "vocab_size": vocab, "expansion_factor": 2, "mamba_moe_layers": layers,
        "ffn_hidden_size": 24, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 2048
    });
    Config::from_json_str(&json.to_string()).expect("valid tiny config")
}

/// A model with perturbed random weights (every tensor matters).
pub fn tiny_model(cfg: &Config, seed: u64) -> Model {
    let w = random_weights(cfg, RandomInit { seed, perturb: true }, DType::F32, &Device::Cpu).unwrap();
    Model::from_tensors(cfg, w, DType::F32, &Device::Cpu).unwrap()
}

/// Largest absolute difference of two same-shaped tensors.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Random token ids below `vocab`.
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = blackmamba::rng::Rng::new(seed);
    (0..n).map(|_| r.below(vocab) as u32).collect()
}
