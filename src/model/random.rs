//! Random weights for any config (SPEC §9 "init"): the tiny models of the tests, the demo model
//! and the `random:1.5b` / `random:2.8b` shapes of the benchmark. Deterministic per seed.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::config::Config;
use crate::model::weights::expected_tensors;
use crate::rng::Rng;

/// How to draw the weights.
#[derive(Debug, Clone, Copy)]
pub struct RandomInit {
    pub seed: u64,
    /// Also randomise norms, biases and D (as the golden fixture does), so that every tensor
    /// changes the output; the plain init leaves them at 1 / 0.
    pub perturb: bool,
}

fn fill(n: usize, mut f: impl FnMut() -> f64) -> Vec<f32> {
    (0..n).map(|_| f() as f32).collect()
}

/// Draws every tensor of `cfg`'s checkpoint, in f32 on the host, then moves it to `device`.
pub fn random_tensors(cfg: &Config, init: RandomInit, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(init.seed);
    let mut out = HashMap::new();
    let n_state = cfg.state_size;
    let depth_scale = 1.0 / (cfg.num_layers as f64).sqrt();
    for (name, shape) in expected_tensors(cfg) {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        let kaiming = 1.0 / fan_in.sqrt();
        let p = init.perturb;
        let v: Vec<f32> = if name.ends_with("A_log") {
            let mut a: Vec<f32> = (0..n).map(|i| ((i % n_state) + 1) as f32).map(f32::ln).collect();
            if p {
                a.iter_mut().for_each(|x| *x += (0.2 * rng.normal()) as f32);
            }
            a
        } else if name.ends_with(".D") {
            fill(n, || if p { 1.0 + 0.2 * rng.normal() } else { 1.0 })
        } else if name.ends_with("dt_proj.bias") {
            // inverse softplus of a log-uniform Δ in [1e-3, 0.1]
            fill(n, || {
                let dt = (rng.uniform() * (0.1f64.ln() - 1e-3f64.ln()) + 1e-3f64.ln()).exp().max(1e-4);
                let b = dt + (-(-dt).exp_m1()).ln();
                if p {
                    b + 0.5 * rng.normal()
                } else {
                    b
                }
            })
        } else if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            fill(n, || if p { 1.0 + 0.1 * rng.normal() } else { 1.0 })
        } else if name.ends_with(".bias") {
            fill(n, || if p { 0.1 * rng.normal() } else { 0.0 })
        } else if name == "embedding.word_embeddings.weight" {
            let s = if p { 0.3 } else { 0.02 };
            fill(n, || s * rng.normal())
        } else if name.ends_with("conv1d.weight") {
            fill(n, || (2.0 * rng.uniform() - 1.0) * 0.5)
        } else {
            // Linear layers: kaiming-uniform; out_proj and fc2 shrink with depth
            let mut bound = kaiming;
            if name.ends_with("out_proj.weight") || name.ends_with("linear_fc2.weight") {
                bound *= depth_scale;
            }
            if p {
                bound *= 2.5;
            }
            fill(n, || (2.0 * rng.uniform() - 1.0) * bound)
        };
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?);
    }
    Ok(out)
}

/// Random weights converted like a loaded checkpoint (matrices in `dtype`, the rest f32).
pub fn random_weights(cfg: &Config, init: RandomInit, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let t = random_tensors(cfg, init, device)?;
    crate::model::weights::check_and_convert(cfg, t, dtype)
}
