//! Helpers of the GPU parity tests of single fused ops (`*_gpu.rs`, compiled with `--features
//! cuda`): the device, host copies and the relative difference they compare by.
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};

/// The first CUDA device, the one policy of every GPU test: without a device the test is
/// skipped with one line saying so, unless `BLACKMAMBA_REQUIRE_GPU=1` (bench/gpu_run.sh sets it
/// on the GPU machine), where a missing device fails it.
pub fn device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let required = std::env::var("BLACKMAMBA_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(!required, "BLACKMAMBA_REQUIRE_GPU is set but there is no CUDA device: {e}");
            eprintln!("skipped: no CUDA device ({e}); BLACKMAMBA_REQUIRE_GPU=1 makes this a failure");
            None
        }
    }
}

/// A tensor's values on the host, as f32.
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max |b| (NaN when either holds a NaN).
pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (host(a), host(b));
    if a.iter().chain(&b).any(|x| x.is_nan()) {
        return f32::NAN;
    }
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let s = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    d / s.max(1e-6)
}

/// A bf16 model of three half-blocks (Mamba, 8-expert MoE, Mamba) with the released state size
/// and conv width, d 192 (d_inner 384: three channel blocks of the scan kernels), experts of
/// `ffn` hidden units; random weights from `seed`, on its differentiable path.
pub fn block_model(ffn: usize, seed: u64, dev: &Device) -> blackmamba::model::Model {
    let json = serde_json::json!({
        "num_layers": 3, "hidden_size": 192, "state_size": 16, "conv_dimension": 4,
        "vocab_size": 64, "expansion_factor": 2, "mamba_moe_layers": ["r", "8", "r"],
        "ffn_hidden_size": ffn, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 2048
    });
    let cfg = blackmamba::model::config::Config::from_json_str(&json.to_string()).unwrap();
    let init = blackmamba::model::random::RandomInit { seed, perturb: true };
    let w = blackmamba::model::random::random_weights(&cfg, init, DType::BF16, dev).unwrap();
    let mut model = blackmamba::model::Model::from_tensors(&cfg, w, DType::BF16, dev).unwrap();
    model.differentiable = true;
    model
}

/// Makes half-block `layer` of `model` trained in full as the trainer sets it up: f32
/// variables, the model holding bf16 casts of the bf16 weights and the f32 variables themselves
/// for the rest. Returns each tensor's name and variable.
pub fn train_layer(model: &mut blackmamba::model::Model, layer: usize) -> Vec<(String, candle_core::Var)> {
    let mut vars = Vec::new();
    model
        .visit_mut(&mut |name, t| {
            if name.starts_with(&format!("decoder.layers.{layer}.")) {
                let v = candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                *t = v.as_tensor().to_dtype(t.dtype())?;
                vars.push((name.to_string(), v));
            }
            Ok(())
        })
        .unwrap();
    vars
}

/// A half-block's hand-written gradients (`fast`) against autograd's (`store`, from the block's
/// output seeded with the same gradient): the input's (`h`) within 1e-2 and every variable's,
/// carried through its cast as the trainer does, within 2e-2 (relative to the largest value);
/// a variable without a gradient in one must have none in the other.
pub fn check_block_grads(
    fast: &blackmamba::runtime::grad::mamba_block::BlockGrads,
    store: &candle_core::backprop::GradStore,
    h: &candle_core::Var,
    vars: &[(String, candle_core::Var)],
) {
    let want_dh = store.get(h.as_tensor()).unwrap();
    let dh = rel(&fast.dh, want_dh);
    eprintln!("dh: {dh:.2e} (max |dh| {})", host(want_dh).iter().fold(0f32, |m, x| m.max(x.abs())));
    assert!(dh < 1e-2, "input gradient differs by {dh}");
    let stores: Vec<_> = fast
        .params
        .iter()
        .map(|(t, grad)| {
            assert_eq!(grad.dtype(), t.dtype());
            t.backward_seeded(grad).unwrap()
        })
        .collect();
    for (name, v) in vars {
        let (got, want) = match (stores.iter().find_map(|s| s.get(v.as_tensor())), store.get(v.as_tensor())) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => {
                eprintln!("{name}: no gradient in either");
                continue;
            }
            (a, b) => panic!(
                "{name}: a gradient in one path only (hand-written {}, autograd {})",
                a.is_some(),
                b.is_some()
            ),
        };
        let r = rel(got, want);
        let scale = host(want).iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!("{name}: {r:.2e} (max |grad| {scale:.3e})");
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(r < 2e-2, "{name}: gradient differs by {r}");
    }
}
