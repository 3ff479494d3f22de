//! The golden fixture `tests/fixtures/tiny-a` (outputs of Zyphra's reference code): logits of every
//! prompt through both paths, experts, router probabilities, the cached run, and Sinkhorn.

#![allow(clippy::unwrap_used)]

use std::path::Path;

mod common;

use blackmamba::commands::logits::{routing_tensors, teacher_forced};
use blackmamba::loader::load_dir;
use blackmamba::model::{Logits, Model};
use blackmamba::sinkhorn::{sinkhorn, SinkhornOpts, Variant};
use candle_core::{safetensors::load, DType, Device, Tensor};
use common::max_abs;

fn fixture() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"))
}

fn model() -> Model {
    load_dir(fixture(), &Device::Cpu, DType::F32).expect("fixture loads").0
}

fn ids(exp: &std::collections::HashMap<String, Tensor>, k: usize) -> Vec<u32> {
    exp[&format!("ids.{k}")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

#[test]
fn full_sequence_and_step_paths_match_the_reference() {
    let m = model();
    let exp = load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    for k in 0..4 {
        let ids = ids(&exp, k);
        for step in [false, true] {
            let (logits, probe) = teacher_forced(&m, &ids, step).unwrap();
            let d = max_abs(&logits, &exp[&format!("logits.{k}")]);
            assert!(d < 1e-4, "prompt {k} (len {}), step={step}: max |Δ logits| = {d}", ids.len());
            let (experts, probs) = routing_tensors(&probe, 8).unwrap();
            assert_eq!(
                experts.to_vec2::<i64>().unwrap(),
                exp[&format!("experts.{k}")].to_vec2::<i64>().unwrap(),
                "prompt {k} step={step}: experts"
            );
            let dp = max_abs(&probs, &exp[&format!("router_probs.{k}")]);
            assert!(dp < 1e-5, "prompt {k} step={step}: max |Δ router probs| = {dp}");
        }
    }
}

#[test]
fn prefill_of_eight_then_steps_matches_the_reference_cached_run() {
    let m = model();
    let exp = load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = ids(&exp, 3);
    let mut state = m.new_state(1).unwrap();
    let head = Tensor::from_slice(&ids[..8], (1, 8), &Device::Cpu).unwrap();
    let mut rows = vec![m.forward(&head, &mut state, Logits::All, None).unwrap().squeeze(0).unwrap()];
    for &id in &ids[8..] {
        rows.push(
            m.step(&Tensor::from_slice(&[id], 1, &Device::Cpu).unwrap(), &mut state, None)
                .unwrap(),
        );
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs(&got, &exp["step_logits.3"]);
    assert!(d < 1e-4, "cached run: max |Δ| = {d}");
}

#[test]
fn every_prefix_length_then_steps_equals_the_full_sequence() {
    let m = model();
    let exp = load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = ids(&exp, 2); // 17 tokens
    let full = teacher_forced(&m, &ids, false).unwrap().0;
    for p in 1..ids.len() {
        let mut state = m.new_state(1).unwrap();
        let head = Tensor::from_slice(&ids[..p], (1, p), &Device::Cpu).unwrap();
        let mut rows = vec![m.forward(&head, &mut state, Logits::All, None).unwrap().squeeze(0).unwrap()];
        for &id in &ids[p..] {
            rows.push(
                m.step(&Tensor::from_slice(&[id], 1, &Device::Cpu).unwrap(), &mut state, None)
                    .unwrap(),
            );
        }
        let d = max_abs(&Tensor::cat(&rows, 0).unwrap(), &full);
        assert!(d < 2e-5, "prefix {p}: max |Δ| = {d}");
    }
}

#[test]
fn sinkhorn_reproduces_the_reference_including_iteration_counts() {
    let st = load(fixture().join("sinkhorn.safetensors"), &Device::Cpu).unwrap();
    for k in 0..3 {
        let cost = &st[&format!("cost.{k}")];
        let (t, e) = cost.dims2().unwrap();
        let c: Vec<f32> = cost.flatten_all().unwrap().to_vec1().unwrap();
        let r = sinkhorn(
            &c,
            t,
            e,
            &SinkhornOpts {
                variant: Variant::Zyphra,
                max_iters: 10_000,
                tol: 1e-4,
            },
        );
        let want_iters = st[&format!("iters.{k}")].to_vec1::<i64>().unwrap()[0] as usize;
        assert_eq!(r.iters(), want_iters, "case {k}: iterations");
        assert!(r.converged);
        let want: Vec<f32> = st[&format!("out.{k}")].flatten_all().unwrap().to_vec1().unwrap();
        for (i, (a, b)) in r.plan.iter().zip(&want).enumerate() {
            let rel = (a - b).abs() / b.abs().max(1e-30);
            assert!(rel < 1e-5, "case {k} element {i}: {a} vs {b} (rel {rel})");
        }
    }
}
