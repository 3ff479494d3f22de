//! Shared pieces of the megakernel tests (schedule/interpreter, formats, GPU): the fixtures,
//! the reference step, the comparison of one token's outputs, and the plan-dequantised model.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blackmamba::loader::load_dir;
use blackmamba::model::config::Config;
use blackmamba::model::probe::Probe;
use blackmamba::model::state::State;
use blackmamba::model::Model;
use blackmamba::runtime::megakernel::pack::roundtrip;
use blackmamba::runtime::megakernel::*;
use candle_core::{DType, Device, Tensor};

/// The golden fixture; `BM_FIXTURE_DIR` points elsewhere when the test binary runs away from
/// its checkout (the device machine, bench/gpu_run.sh).
pub fn fixture() -> PathBuf {
    std::env::var_os("BM_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a")).to_path_buf())
}

/// The tiny-a fixture in f32 on the CPU.
pub fn tiny_a() -> Model {
    load_dir(&fixture(), &Device::Cpu, DType::F32).unwrap().0
}

/// A config off every default the loader accepts: dense and MoE layers of 3 and 5 experts,
/// biases on every linear layer, no gating, SiLU experts, K = 3, N = 8, d not a multiple of 16.
pub fn odd_config() -> Config {
    let json = serde_json::json!({
        "num_layers": 6, "hidden_size": 40, "state_size": 8, "conv_dimension": 3,
        "vocab_size": 300, "expansion_factor": 2, "mamba_moe_layers": ["r", "3", "1", "r", "r", "5"],
        "ffn_hidden_size": 36, "add_bias_linear": true, "swiglu": false, "max_sequence_length": 2048,
        "expert_activation": "silu", "layernorm_epsilon": 1e-6
    });
    Config::from_json_str(&json.to_string()).unwrap()
}

/// max |a − b| / (1 + max |b|) (infinite on a NaN).
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) });
    d / scale
}

/// What `Model::step` of `reference` gives for `tok`: the logits, the probe, the state after.
pub fn reference_step(reference: &Model, state: &mut State, tok: u32) -> (Vec<f32>, Probe, HostState) {
    let mut probe = Probe::new();
    let ids = Tensor::from_slice(&[tok], 1, &Device::Cpu).unwrap();
    let want = reference
        .step(&ids, state, Some(&mut probe))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let host = HostState::from_state(state).unwrap();
    (want, probe, host)
}

/// Asserts that `got` routes every MoE layer as `probe` did (token `t`) and returns the largest
/// relative difference of the router probabilities.
pub fn route_diff(got: &TokenOut, probe: &Probe, t: usize) -> f32 {
    assert_eq!(got.routes.len(), probe.moe.len());
    let mut dp = 0f32;
    for (r, rec) in got.routes.iter().zip(&probe.moe) {
        assert_eq!(
            (r.layer, r.expert),
            (rec.layer, rec.experts[0]),
            "token {t}: route of layer {}",
            rec.layer
        );
        let probs: Vec<f32> = (0..rec.n_experts).map(|e| rec.prob(0, e)).collect();
        dp = dp.max(max_diff(&r.probs, &probs));
    }
    dp
}

/// The largest relative difference of the conv windows and SSM states.
pub fn state_diff(got: &HostState, want: &HostState) -> f32 {
    let mut ds = 0f32;
    for (a, b) in got.conv.iter().chain(&got.ssm).zip(want.conv.iter().chain(&want.ssm)) {
        ds = ds.max(max_diff(a, b));
    }
    ds
}

/// `model` with every matrix rounded through `plan`'s format as the kernel stores it (x_proj,
/// out_proj and fc2 transposed, so their scales run along input channels), in f32 on the CPU.
pub fn dequantised(model: &Model, plan: &FormatPlan) -> Model {
    let mut map = HashMap::new();
    for (name, t) in model.named_tensors().unwrap() {
        let stored = [
            ("in_proj.weight", plan.in_proj, false),
            ("x_proj.weight", plan.x_proj, true),
            ("dt_proj.weight", plan.dt_proj, false),
            ("out_proj.weight", plan.out_proj, true),
            ("linear_fc1.weight", plan.fc1, false),
            ("linear_fc2.weight", plan.fc2, true),
            ("embedding.word_embeddings.weight", plan.head, false),
        ]
        .into_iter()
        .find(|(suffix, ..)| name.ends_with(suffix));
        let t = match stored {
            None => t,
            Some((_, fmt, transposed)) => {
                let s = if transposed { t.t().unwrap().contiguous().unwrap() } else { t };
                let (r, c) = s.dims2().unwrap();
                let v = roundtrip(&s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), r, c, fmt).unwrap();
                let s = Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap();
                if transposed {
                    s.t().unwrap().contiguous().unwrap()
                } else {
                    s
                }
            }
        };
        map.insert(name, t);
    }
    Model::from_tensors(&model.cfg, map, DType::F32, &Device::Cpu).unwrap()
}
