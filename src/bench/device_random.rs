//! Random weights drawn on the model's device (for `bench --model random:1.5b|2.8b`): the same
//! init rules as [`crate::model::random`] (SPEC §9), but the large matrices come from the
//! device's generator, so a 2.8B model is ready in seconds instead of minutes of host sampling.
//! Small per-channel vectors use the host generator, as the core init does.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::config::Config;
use crate::model::weights::{check_and_convert, expected_tensors};
use crate::model::Model;
use crate::rng::Rng;

/// A model of `cfg`'s shapes with random weights drawn mostly on `device`.
pub fn random_model(cfg: &Config, seed: u64, device: &Device, dtype: DType) -> Result<Model> {
    if device.is_cuda() {
        device.set_seed(seed)?;
    }
    let mut rng = Rng::new(seed);
    let n_state = cfg.state_size;
    let depth_scale = 1.0 / (cfg.num_layers as f64).sqrt();
    let mut out = HashMap::new();
    for (name, shape) in expected_tensors(cfg) {
        let n: usize = shape.iter().product();
        let host = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, shape.clone(), &Device::Cpu)?.to_device(device)?) };
        let t = if name.ends_with("A_log") {
            host((0..n).map(|i| (((i % n_state) + 1) as f32).ln()).collect())?
        } else if name.ends_with(".D") || name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            Tensor::ones(shape.clone(), DType::F32, device)?
        } else if name.ends_with("dt_proj.bias") {
            host(
                (0..n)
                    .map(|_| {
                        let dt = (rng.uniform() * (0.1f64.ln() - 1e-3f64.ln()) + 1e-3f64.ln()).exp().max(1e-4);
                        (dt + (-(-dt).exp_m1()).ln()) as f32
                    })
                    .collect(),
            )?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.clone(), DType::F32, device)?
        } else if name == "embedding.word_embeddings.weight" {
            Tensor::randn(0f32, 0.02, shape.clone(), device)?
        } else if name.ends_with("conv1d.weight") {
            Tensor::rand(-0.5f32, 0.5, shape.clone(), device)?
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let mut bound = 1.0 / fan_in.sqrt();
            if name.ends_with("out_proj.weight") || name.ends_with("linear_fc2.weight") {
                bound *= depth_scale;
            }
            Tensor::rand(-bound as f32, bound as f32, shape.clone(), device)?
        };
        out.insert(name, t);
    }
    let w = check_and_convert(cfg, out, dtype)?;
    Model::from_tensors(cfg, w, dtype, device)
}
