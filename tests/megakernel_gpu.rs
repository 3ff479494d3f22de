//! The CUDA megakernel (issue 17, `kernels/megakernel.cu`) against `Model::step` token by token:
//! logits, routes, router probabilities and the recurrent state after every token. Skipped with
//! one line without a CUDA device (`BLACKMAMBA_REQUIRE_GPU=1` makes that a failure). Compiled
//! with `--features cuda` only.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
mod gpu_common;
mod mk_common;

use blackmamba::model::config::Config;
use blackmamba::model::Model;
use blackmamba::rng::Rng;
use blackmamba::runtime::megakernel::cuda::{MegaDecoder, MegaOpts};
use blackmamba::runtime::megakernel::*;
use candle_core::Device;
use mk_common::{dequantised, max_diff, odd_config, reference_step, route_diff, state_diff, tiny_a};

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
        let (want, probe, want_state) = reference_step(reference, &mut state, tok);
        let got = mega.step(tok).unwrap();
        dl = dl.max(max_diff(&got.logits, &want));
        dp = dp.max(route_diff(&got, &probe, t));
        ds = ds.max(state_diff(&mega.state().unwrap(), &want_state));
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
