//! The CUDA megakernel (issue 17, `kernels/megakernel.cu`) against `Model::step` token by token:
//! logits, routes, router probabilities and the recurrent state after every token. Skipped with
//! one line without a CUDA device (`BLACKMAMBA_REQUIRE_GPU=1` makes that a failure). Compiled
//! with `--features cuda` only.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
mod gpu_common;

use std::collections::HashMap;
use std::path::Path;

use blackmamba::loader::load_dir;
use blackmamba::model::config::Config;
use blackmamba::model::probe::Probe;
use blackmamba::model::Model;
use blackmamba::rng::Rng;
use blackmamba::runtime::megakernel::cuda::{MegaDecoder, MegaOpts};
use blackmamba::runtime::megakernel::pack::roundtrip;
use blackmamba::runtime::megakernel::*;
use candle_core::{DType, Device, Tensor};

fn tiny_a() -> Model {
    let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"));
    load_dir(fixture, &Device::Cpu, DType::F32).unwrap().0
}

/// Dense layers, biases, no gating, SiLU, K = 3 (the interpreter's odd config).
fn odd_config() -> Config {
    let json = serde_json::json!({
        "num_layers": 6, "hidden_size": 40, "state_size": 8, "conv_dimension": 3,
        "vocab_size": 300, "expansion_factor": 2, "mamba_moe_layers": ["r", "3", "1", "r", "r", "5"],
        "ffn_hidden_size": 36, "add_bias_linear": true, "swiglu": false, "max_sequence_length": 2048,
        "expert_activation": "silu", "layernorm_epsilon": 1e-6
    });
    Config::from_json_str(&json.to_string()).unwrap()
}

/// `model` with every matrix rounded through `plan`'s format as the kernel stores it (x_proj,
/// out_proj and fc2 transposed): the weights the kernel computes with, in f32 on the CPU.
fn dequantised(model: &Model, plan: &FormatPlan) -> Model {
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

/// max |a − b| / (1 + max |b|) (infinite on a NaN).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) });
    d / scale
}

/// Feeds the same random tokens to `reference`'s `Model::step` (CPU, f32) and to the kernel of
/// `model` in `plan` with `sms` blocks; returns the largest relative differences of logits,
/// router probabilities and states. Routes must agree exactly.
fn parity(dev: &Device, model: &Model, reference: &Model, plan: FormatPlan, sms: Option<usize>, tokens: usize) -> (f32, f32, f32) {
    let cfg = &model.cfg;
    let opts = MegaOpts {
        sms,
        formats: plan,
        ..Default::default()
    };
    let mut mega = MegaDecoder::new(model, dev, &opts).unwrap();
    println!("{}", mega.schedule().stats());
    let mut state = reference.new_state(1).unwrap();
    let mut rng = Rng::new(17);
    let (mut dl, mut dp, mut ds) = (0f32, 0f32, 0f32);
    for t in 0..tokens {
        let tok = rng.below(cfg.vocab_size) as u32;
        let mut probe = Probe::new();
        let ids = Tensor::from_slice(&[tok], 1, &Device::Cpu).unwrap();
        let want = reference
            .step(&ids, &mut state, Some(&mut probe))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_state = HostState::from_state(&state).unwrap();
        let got = mega.step(tok).unwrap();
        dl = dl.max(max_diff(&got.logits, &want));
        assert_eq!(got.routes.len(), probe.moe.len());
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
        let st = mega.state().unwrap();
        for (a, b) in st.conv.iter().chain(&st.ssm).zip(want_state.conv.iter().chain(&want_state.ssm)) {
            ds = ds.max(max_diff(a, b));
        }
    }
    (dl, dp, ds)
}

/// docs/decode.md "Megakernel design": within 1e-5 of the values' scale, as the interpreter. The
/// GPU adds split-K partials in whatever order the atomics land and uses its own expf / log1pf,
/// which moves values by a few ulps per operation; a wrong tile moves them by 1e-2 and more.
const TOL: f32 = 1e-5;

fn check(name: &str, (dl, dp, ds): (f32, f32, f32)) {
    println!("{name}: max relative |Δ| logits {dl:e}, router probs {dp:e}, states {ds:e}");
    assert!(
        dl < TOL && dp < TOL && ds < TOL,
        "{name}: logits {dl:e}, probs {dp:e}, states {ds:e}"
    );
}

#[test]
fn megakernel_matches_model_step_on_tiny_a_in_f32() {
    let Some(dev) = gpu_common::device() else { return };
    let model = tiny_a();
    let plan = FormatPlan::uniform(WeightFormat::F32);
    // the device's SM count (more SMs than rows: some SMs get no tile of an op), then 3 and 16
    for sms in [None, Some(3), Some(16)] {
        check(&format!("tiny-a f32, sms {sms:?}"), parity(&dev, &model, &model, plan, sms, 512));
    }
}

#[test]
fn megakernel_matches_model_step_on_an_odd_config_in_f32() {
    let Some(dev) = gpu_common::device() else { return };
    let model = common::tiny_model(&odd_config(), 5);
    let plan = FormatPlan::uniform(WeightFormat::F32);
    for sms in [None, Some(7)] {
        check(
            &format!("odd config f32, sms {sms:?}"),
            parity(&dev, &model, &model, plan, sms, 512),
        );
    }
}

#[test]
fn megakernel_matches_model_step_in_bf16() {
    let Some(dev) = gpu_common::device() else { return };
    let plan = FormatPlan::uniform(WeightFormat::Bf16);
    let random = common::tiny_model(&common::tiny_config(&["r", "8", "8", "r"], 32, 100), 9);
    for (name, model) in [("tiny-a", tiny_a()), ("tiny r/8/8/r", random)] {
        let reference = dequantised(&model, &plan);
        check(&format!("{name} bf16"), parity(&dev, &model, &reference, plan, None, 512));
    }
}

#[test]
fn megakernel_matches_model_step_on_1_5b_shaped_layers_in_bf16() {
    let Some(dev) = gpu_common::device() else { return };
    // the released 1.5B widths (d 1152, d_inner 2304, N 16, 8 experts of 3072), four layers and a
    // small vocabulary so that the CPU reference stays quick
    let mut cfg = Config::blackmamba_1_5b();
    cfg.num_layers = 4;
    cfg.mamba_moe_layers.truncate(4);
    cfg.vocab_size = 1000;
    let model = common::tiny_model(&cfg, 21);
    let plan = FormatPlan::uniform(WeightFormat::Bf16);
    let reference = dequantised(&model, &plan);
    check("1.5B-shaped layers bf16", parity(&dev, &model, &reference, plan, None, 512));
}
