//! Quantised models on the CPU (issue 22): every quantised linear within the error its format
//! allows, the embedded model and the tiny-a fixture generating text quantised, their logits and
//! routes against the unquantised model.
//!
//! The bounds, derived from the formats:
//! * one linear: round-to-nearest leaves each weight within half a step h (s/2; fp8: half the
//!   E4M3 spacing, times s), so |Δy_r| ≤ Σ_i |x_i|·h_ri. The GGML matmul also rounds x to Q8_0
//!   blocks (scale d = max|x| of 32 / 127, stored as f16: |Δx_i| ≤ d/2 + 127·d·2⁻¹¹ < 0.57·d), adding
//!   Σ_i |ŵ_ri|·0.57·d_i.
//! * the whole model: no closed form (the gain of a trained network is its own), so the bound is
//!   the classic model of rounding: RTN error behaves like independent noise of the same
//!   magnitudes. The noise twin adds each quantised weight's own error with a random sign; the
//!   dequantised model's relative logits error must stay within 3 × the twin's (the mean of three
//!   draws). A quantiser with a systematic bias (a wrong scale, an off-by-one code) fails it. The
//!   GGML path (which also rounds activations) is reported beside it and bounded against int8's
//!   twin at the end.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use blackmamba::loader::load_dir;
use blackmamba::model::linear::Linear;
use blackmamba::model::Model;
use blackmamba::quant::apply::{for_each_linear, quantize_model};
use blackmamba::quant::compare::compare;
use blackmamba::quant::{Part, QuantFormat, QuantSpec};
use candle_core::{DType, Device, Tensor};

fn fixture() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"))
}

fn linears(m: &Model) -> Vec<(String, Part, Linear)> {
    let mut m = m.clone();
    let mut out = Vec::new();
    for_each_linear(&mut m, &mut |n, p, l| {
        out.push((n.to_string(), p, l.clone()));
        Ok(())
    })
    .unwrap();
    out
}

fn quantized(m: &Model, format: QuantFormat, keep: &[Part], ggml: bool) -> Model {
    let mut q = m.clone();
    quantize_model(&mut q, &QuantSpec::new(format, keep, &[], ggml).unwrap()).unwrap();
    q
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks every quantised linear of `q` against its unquantised twin in `m` on a pseudo-random
/// input, within the bound of the module docs; returns how many it checked.
fn check_linears(m: &Model, q: &Model, spec: &QuantSpec) -> usize {
    let (ggml, mut checked) = (spec.ggml, 0);
    for ((name, part, l), (_, _, lq)) in linears(m).iter().zip(linears(q)) {
        let Some(ql) = &lq.quant else {
            assert!(!spec.has(*part), "{name} was not quantised");
            continue;
        };
        assert_eq!(ql.uses_ggml(), ggml && ql.weight.format != QuantFormat::Fp8, "{name}");
        let (rows, cols) = (ql.weight.rows, ql.weight.cols);
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0).collect();
        let xt = Tensor::from_vec(x.clone(), (3, cols), &Device::Cpu).unwrap();
        let (y, yq) = (host(&l.forward(&xt).unwrap()), host(&lq.forward(&xt).unwrap()));
        let (w, wq) = (host(&l.weight), ql.weight.dequantize());
        for n in 0..3 {
            let xr = &x[n * cols..(n + 1) * cols];
            for r in 0..rows {
                let mut bound = 0f32;
                for b in 0..cols / 32 {
                    let d = if ggml && ql.uses_ggml() {
                        xr[b * 32..b * 32 + 32].iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0
                    } else {
                        0.0
                    };
                    for i in b * 32..b * 32 + 32 {
                        bound += xr[i].abs() * ql.weight.half_step(r * cols + i) + wq[r * cols + i].abs() * 0.57 * d;
                    }
                }
                let got = (yq[n * rows + r] - y[n * rows + r]).abs();
                assert!(got <= bound * 1.0001 + 1e-5, "{name} row {r}: |Δy| {got} > bound {bound}");
            }
        }
        assert_eq!(host(&lq.weight), wq, "{name}: the dense copy is the dequantised weight");
        assert!(w != wq, "{name}: quantisation changed nothing");
        checked += 1;
    }
    checked
}

/// The noise twin of a quantised model: every quantised weight W + r·(Ŵ − W), r = ±1 at random per
/// element: the same error magnitudes as the quantisation's, its correlations and signs lost.
fn noise_twin(m: &Model, q: &Model, seed: u64) -> Model {
    let mut rng = seed;
    let mut flip = |w: &Tensor, wq: &Tensor| -> Tensor {
        let (w, wq) = (host(w), host(wq));
        let v: Vec<f32> = w
            .iter()
            .zip(&wq)
            .map(|(a, b)| {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if rng >> 63 == 0 {
                    a + (b - a)
                } else {
                    a - (b - a)
                }
            })
            .collect();
        Tensor::from_vec(v, w.len(), &Device::Cpu).unwrap()
    };
    let mut n = q.clone();
    let refs = linears(m);
    let mut k = 0;
    for_each_linear(&mut n, &mut |_, _, l| {
        if l.quant.take().is_some() {
            l.weight = flip(&refs[k].2.weight, &l.weight).reshape(l.weight.shape()).unwrap();
        }
        k += 1;
        Ok(())
    })
    .unwrap();
    if n.head_quant.take().is_some() {
        n.embedding = flip(&m.embedding, &n.embedding).reshape(m.embedding.shape()).unwrap();
    }
    n
}

/// The logits bound of the module docs: 3 × the noise twin's relative RMS error (the mean of
/// three draws).
fn noise_bound(m: &Model, q: &Model, ids: &[u32]) -> f64 {
    let errs: Vec<f64> = (1..=3)
        .map(|seed| compare(m, &noise_twin(m, q, seed), ids, 64, "noise").unwrap().logits_rel_rms)
        .collect();
    3.0 * errs.iter().sum::<f64>() / 3.0
}

#[test]
fn every_linear_of_tiny_a_within_its_format_bound() {
    let m = load_dir(fixture(), &Device::Cpu, DType::F32).unwrap().0;
    for (f, keep) in [
        (QuantFormat::Int8, vec![]),
        (QuantFormat::Fp8, vec![]),
        (QuantFormat::Q4 { group: 64 }, vec![Part::Fc2]),
    ] {
        for ggml in [true, false] {
            let spec = QuantSpec::new(f, &keep, &[], ggml).unwrap();
            let q = quantized(&m, f, &keep, ggml);
            // 2 Mamba layers × 3, 2 MoE layers × 8 experts × (fc1, fc2 unless kept)
            let want = 6 + 16 * (2 - keep.len());
            assert_eq!(check_linears(&m, &q, &spec), want, "{f}");
        }
    }
}

#[test]
fn tiny_a_quantised_logits_and_routes_against_the_unquantised_model() {
    let m = load_dir(fixture(), &Device::Cpu, DType::F32).unwrap().0;
    let exp = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..4)
        .flat_map(|k| exp[&format!("ids.{k}")].to_vec1::<i64>().unwrap())
        .map(|x| x as u32)
        .collect();
    let mut rel = Vec::new();
    for (f, keep) in [
        (QuantFormat::Int8, vec![]),
        (QuantFormat::Fp8, vec![]),
        (QuantFormat::Q4 { group: 64 }, vec![Part::Fc2]),
    ] {
        let q = quantized(&m, f, &keep, true);
        let c = compare(&m, &q, &ids, 64, &f.name()).unwrap();
        println!("{}", c.to_markdown());
        // the format's own error (the dequantised weights) against its noise twin's
        let twin = compare(&m, &quantized(&m, f, &keep, false), &ids, 64, &f.name()).unwrap();
        let bound = noise_bound(&m, &q, &ids);
        println!(
            "{f}: logits relative RMS {} (dequantised only {}), bound {bound}",
            c.logits_rel_rms, twin.logits_rel_rms
        );
        assert!(
            twin.logits_rel_rms <= bound,
            "{f}: logits relative RMS {} past {bound}",
            twin.logits_rel_rms
        );
        assert!(twin.logits_rel_rms > 0.0, "{f}: quantisation changed nothing");
        assert_eq!(c.layers.len(), 2);
        assert!(c.layers.iter().all(|l| l.tokens == ids.len()));
        rel.push(c.logits_rel_rms);
        // quantised greedy decoding runs (the step path) and stays in the vocabulary
        let text = greedy(&q, &ids[..4], 8);
        assert_eq!(text.len(), 12);
        assert!(text.iter().all(|&t| (t as usize) < q.cfg.vocab_size));
    }
    assert!(rel[0] < rel[2], "int8 ({}) should be closer than q4 ({})", rel[0], rel[2]);
    // the dequantise-then-matmul twin against the GGML path: only the activations' 8-bit rounding differs
    let twin = compare(
        &quantized(&m, QuantFormat::Int8, &[], true),
        &quantized(&m, QuantFormat::Int8, &[], false),
        &ids,
        64,
        "twin",
    )
    .unwrap();
    assert!(
        twin.logits_rel_rms < rel[0] * 2.0,
        "twin {} vs int8 {}",
        twin.logits_rel_rms,
        rel[0]
    );
}

#[test]
fn q4_on_a_shape_its_group_does_not_divide_is_one_line_error() {
    let m = load_dir(fixture(), &Device::Cpu, DType::F32).unwrap().0;
    let mut q = m.clone();
    let e = quantize_model(&mut q, &QuantSpec::new(QuantFormat::Q4 { group: 64 }, &[], &[], true).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linear_fc2.weight") && e.contains("96") && e.contains("--quant-keep") && !e.contains('\n'),
        "{e}"
    );
    let e = QuantSpec::new(QuantFormat::Int8, &[Part::Router], &[Part::Router], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Router"), "{e}");
}

fn greedy(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut state = m.new_state(1).unwrap();
    let t = Tensor::from_slice(prompt, (1, prompt.len()), &Device::Cpu).unwrap();
    let mut logits = m
        .forward(&t, &mut state, blackmamba::model::Logits::Last, None)
        .unwrap()
        .flatten_all()
        .unwrap();
    let mut out = prompt.to_vec();
    for _ in 0..n {
        let id = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(id);
        logits = m
            .step(&Tensor::from_slice(&[id], 1, &Device::Cpu).unwrap(), &mut state, None)
            .unwrap()
            .flatten_all()
            .unwrap();
    }
    out
}

#[test]
fn embedded_model_generates_text_quantised() {
    let (m, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let ids = blackmamba::tokenizer::encode(
        &tok,
        "Once upon a time, a little fox found a shiny stone in the forest. She showed it to her friend the owl, who said",
    )
    .unwrap();
    for f in [QuantFormat::Int8, QuantFormat::Fp8, QuantFormat::Q4 { group: 64 }] {
        let q = quantized(&m, f, &[], true);
        let out = greedy(&q, &ids, 12);
        let text = blackmamba::tokenizer::decode(&tok, &out[ids.len()..]).unwrap();
        println!("{f}: {text:?}");
        assert!(!text.trim().is_empty(), "{f}: no text");
        let c = compare(&m, &q, &ids, 64, &f.name()).unwrap();
        println!("{}", c.to_markdown());
        let twin = compare(&m, &quantized(&m, f, &[], false), &ids, 64, &f.name()).unwrap();
        let bound = noise_bound(&m, &q, &ids);
        println!(
            "{f}: logits relative RMS {} (dequantised only {}), bound {bound}",
            c.logits_rel_rms, twin.logits_rel_rms
        );
        assert!(
            twin.logits_rel_rms <= bound,
            "{f}: logits relative RMS {} past {bound}",
            twin.logits_rel_rms
        );
        assert!(c.ppl_quant.is_finite() && c.ppl_quant > 1.0);
    }
}
