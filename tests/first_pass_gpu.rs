//! Pass 1 of the recomputed training step on the fused inference kernels
//! (`runtime::grad::first_pass_block`) against its twin, the differentiable tensor ops of
//! `Model::block` (`--first-pass ops`): trainers on the same CUDA model and data take the same
//! steps (loss, gradient norm, Sinkhorn routing, updated weights), for LoRA on every target and
//! for every weight. f32, where the two paths differ only in the order of additions; and bf16,
//! where they round at different places, with a looser check. Runs only in a `--features cuda`
//! build on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod ft_common;
mod gpu_common;

use blackmamba::finetune::data::{self, DataFormat};
use blackmamba::finetune::{FirstPass, Method, Recompute, StepReport, Trainer};
use blackmamba::model::random::{random_weights, RandomInit};
use blackmamba::model::Model;
use candle_core::{DType, Device};
use ft_common::{byte_tokenizer, config, run_config, write, TEXT, VOCAB};

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

type Run = (Vec<StepReport>, Vec<(String, Vec<f32>)>);

/// `steps` steps of `method` with pass 1 on `first`, every layer recomputed.
fn train(dev: &Device, dtype: DType, method: Method, first: FirstPass, steps: usize) -> Run {
    let dev = dev.clone();
    // Mamba and 8-expert MoE layers, wide enough for several channel blocks of the kernels
    let cfg = config(&["r", "8", "r", "8", "r", "8"], 192);
    let w = random_weights(&cfg, RandomInit { seed: 5, perturb: true }, dtype, &dev).unwrap();
    let base = Model::from_tensors(&cfg, w, dtype, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer();
    let data_path = write(dir.path(), "t.txt", &TEXT.repeat(6));
    let mut fc = run_config(data_path.clone(), dir.path().join("unused"), method, steps);
    fc.seq_len = 64;
    fc.recompute = Recompute::On;
    fc.first_pass = first;
    let ds = data::load(&data_path, DataFormat::Auto, &tok, fc.seq_len, VOCAB).unwrap();
    let (train, _) = data::split(ds.examples, fc.eval_fraction, fc.seed);
    let mut t = Trainer::in_memory(&base, &tok, fc, train).unwrap();
    let reports: Vec<_> = (0..steps).map(|_| t.step().unwrap()).collect();
    let weights = t
        .model()
        .unwrap()
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, w)| (n, w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    (reports, weights)
}

#[test]
fn kernel_first_pass_takes_the_steps_of_the_tensor_op_first_pass() {
    let Some(dev) = gpu_common::device() else { return };
    for method in [Method::Lora, Method::Full] {
        let (fast, w_fast) = train(&dev, DType::F32, method, FirstPass::Kernels, 3);
        let (slow, w_slow) = train(&dev, DType::F32, method, FirstPass::Ops, 3);
        for (a, b) in fast.iter().zip(&slow) {
            let what = format!("f32 {method:?} step {}", a.step);
            eprintln!(
                "{what}: loss {} / {}, gradient norm {} / {}",
                a.loss, b.loss, a.grad_norm, b.grad_norm
            );
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * b.loss.abs(),
                "{what}: loss {} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-4 * b.grad_norm,
                "{what}: gradient norm {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
            assert_eq!(a.expert_load, b.expert_load, "{what}: routing");
            assert!(a.expert_load.iter().flatten().sum::<usize>() > 0, "{what}: no routing recorded");
        }
        assert_eq!(w_fast.len(), w_slow.len());
        for ((n, a), (_, b)) in w_fast.iter().zip(&w_slow) {
            // AdamW divides each gradient element by its own running size, so an element whose
            // gradient is ~0 up to rounding moves by up to ~lr either way: the weights after the
            // steps are compared by their whole-tensor difference (the largest single difference
            // is printed; for a LoRA B, zero at the start, it is made of such updates alone)
            let (r, l2) = (max_rel(a, b), l2_rel(a, b));
            if r > 1e-5 {
                eprintln!("f32 {method:?}: {n}: largest difference {r:.2e}, in norm {l2:.2e} (relative)");
            }
            assert!(l2 <= 1e-4, "f32 {method:?}: {n} differs by {l2} in norm (relative), {r} at most");
        }
    }
}

/// ‖a − b‖ / ‖b‖
fn l2_rel(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn kernel_first_pass_in_bf16_stays_within_rounding() {
    let Some(dev) = gpu_common::device() else { return };
    // bf16 rounds the two paths' intermediates at different places (about 4e-3 relative each):
    // one step's loss and gradient norm are compared (the next steps start from weights that
    // AdamW moved apart, as in the f32 test, and diverge further in bf16)
    let (fast, _) = train(&dev, DType::BF16, Method::Full, FirstPass::Kernels, 1);
    let (slow, _) = train(&dev, DType::BF16, Method::Full, FirstPass::Ops, 1);
    let (a, b) = (&fast[0], &slow[0]);
    eprintln!(
        "bf16: loss {} / {}, gradient norm {} / {}",
        a.loss, b.loss, a.grad_norm, b.grad_norm
    );
    assert!(
        (a.loss - b.loss).abs() <= 2e-3 * b.loss.abs(),
        "bf16: loss {} vs {}",
        a.loss,
        b.loss
    );
    assert!(
        (a.grad_norm - b.grad_norm).abs() <= 2e-2 * b.grad_norm,
        "bf16: gradient norm {} vs {}",
        a.grad_norm,
        b.grad_norm
    );
}

#[test]
fn bf16_weights_follow_their_f32_masters_across_steps() {
    // The fused AdamW writes the model's bf16 copy of each master in place (no recast): after
    // a few steps of training every weight, the weights the model computes with must be the
    // bf16 casts of the saved f32 masters.
    let Some(dev) = gpu_common::device() else { return };
    let cfg = config(&["r", "8", "r", "8"], 64);
    let w = random_weights(&cfg, RandomInit { seed: 9, perturb: true }, DType::BF16, &dev).unwrap();
    let base = Model::from_tensors(&cfg, w, DType::BF16, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer();
    let data_path = write(dir.path(), "t.txt", &TEXT.repeat(4));
    let out = dir.path().join("out");
    let mut fc = run_config(data_path.clone(), out.clone(), Method::Full, 3);
    fc.recompute = Recompute::On;
    let ds = data::load(&data_path, DataFormat::Auto, &tok, fc.seq_len, VOCAB).unwrap();
    let (train, _) = data::split(ds.examples, fc.eval_fraction, fc.seed);
    let mut t = Trainer::in_memory(&base, &tok, fc, train).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    t.save().unwrap();
    let masters = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    let model = t.model().unwrap();
    let mut compared = 0;
    for (name, w) in model.named_tensors().unwrap() {
        let Some(m) = masters.get(&name) else { continue };
        if w.dtype() != DType::BF16 {
            continue;
        }
        let want: Vec<f32> = m
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want, "{name}: the model's bf16 weight is not the cast of its master");
        compared += 1;
    }
    assert!(compared > 10, "only {compared} bf16 weights compared");
    let init = base.named_tensors().unwrap();
    let moved = init.iter().any(|(n, w0)| {
        let m = masters
            .get(n)
            .map(|m| m.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap());
        let w0 = w0.to_dtype(DType::F32).unwrap();
        m.is_some_and(|m| (m - w0).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
    });
    assert!(moved, "no weight moved");
}
