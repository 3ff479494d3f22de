//! Sampling filters, determinism, repetition penalty; UTF-8-safe streaming; stop strings; Sinkhorn
//! options.

#![allow(clippy::unwrap_used)]

use blackmamba::sampling::{argmax, Sampler, SamplingParams};
use blackmamba::sinkhorn::{loads, sinkhorn, SinkhornOpts, Variant};
use blackmamba::tokenizer::{encode, neox, TokenStream};

fn params(t: f64, k: usize, p: f64, min_p: f64) -> SamplingParams {
    SamplingParams {
        temperature: t,
        top_k: k,
        top_p: p,
        min_p,
        repeat_penalty: 1.0,
        seed: 3,
        ..Default::default()
    }
}

fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(p);
    (0..n).map(|_| s.sample(logits, &[])).collect()
}

#[test]
fn greedy_top_k_top_p_and_min_p_keep_the_right_candidates() {
    let logits = [0.0f32, 3.0, 2.9, 1.0, -5.0, 2.0];
    assert!(draws(params(0.0, 0, 1.0, 0.0), &logits, 20).iter().all(|&t| t == 1));
    let k2 = draws(params(1.0, 2, 1.0, 0.0), &logits, 400);
    assert!(k2.iter().all(|&t| t == 1 || t == 2) && k2.contains(&1) && k2.contains(&2));
    // softmax: p1 ≈ 0.40, p2 ≈ 0.36, p5 ≈ 0.15: top-p 0.7 keeps {1, 2}
    let tp = draws(params(1.0, 0, 0.7, 0.0), &logits, 400);
    assert!(tp.iter().all(|&t| t == 1 || t == 2), "{tp:?}");
    // min-p 0.5 keeps tokens with p >= 0.5·p1: {1, 2}
    let mp = draws(params(1.0, 0, 1.0, 0.5), &logits, 400);
    assert!(mp.iter().all(|&t| t == 1 || t == 2));
    // no filter: everything with real mass shows up
    let all = draws(params(1.0, 0, 1.0, 0.0), &logits, 2000);
    for t in [0, 1, 2, 3, 5] {
        assert!(all.contains(&t), "token {t} never drawn");
    }
}

#[test]
fn same_seed_same_draws_and_penalty_discourages_repeats() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(
        draws(params(1.0, 0, 1.0, 0.0), &logits, 50),
        draws(params(1.0, 0, 1.0, 0.0), &logits, 50)
    );
    let mut p = params(0.0, 0, 1.0, 0.0);
    let best = argmax(&logits);
    p.repeat_penalty = 100.0;
    let mut s = Sampler::new(p);
    assert_ne!(s.sample(&logits, &[best]), best);
    assert!(params(1.0, 0, 0.0, 0.0).validate().is_err());
    assert!(params(-1.0, 0, 1.0, 0.0).validate().is_err());
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = neox().unwrap();
    let text = "naïve café — 東京 🐍 done";
    let ids = encode(&tok, text).unwrap();
    let mut s = TokenStream::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = s.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "partial character emitted: {piece:?}");
            out.push_str(&piece);
        }
    }
    if let Some(rest) = s.flush(&tok).unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
}

#[test]
fn sinkhorn_respects_max_iters_and_balances_with_the_standard_variant() {
    let (t, e) = (64, 4);
    let mut r = blackmamba::rng::Rng::new(1);
    // every token prefers expert 0
    let cost: Vec<f32> = (0..t * e)
        .map(|i| if i % e == 0 { 2.0 } else { 0.0 } + (r.normal() * 0.5) as f32)
        .collect();
    let capped = sinkhorn(
        &cost,
        t,
        e,
        &SinkhornOpts {
            variant: Variant::Standard,
            max_iters: 2,
            tol: 0.0,
        },
    );
    assert_eq!(capped.iters(), 2);
    assert!(!capped.converged);
    let full = sinkhorn(
        &cost,
        t,
        e,
        &SinkhornOpts {
            variant: Variant::Standard,
            max_iters: 2000,
            tol: 1e-6,
        },
    );
    assert!(full.converged && full.iters() > 2);
    let last = full.trace.last().unwrap();
    assert!(last.row_err < 1e-3 && last.col_err < 1e-3, "{last:?}");
    let l = loads(&full.assignment, e);
    assert!(l.iter().all(|&x| x >= 8), "balanced loads {l:?}");
    let greedy = loads(&blackmamba::sinkhorn::greedy(&cost, t, e), e);
    assert!(greedy[0] > 40, "greedy piles onto expert 0: {greedy:?}");
}

/// The device sampler takes over the host sampler's generator by its state: a sampler put at
/// another's state draws what that one would have drawn next.
#[test]
fn a_sampler_at_another_ones_generator_state_draws_the_same() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect();
    let mut a = Sampler::new(params(1.0, 0, 1.0, 0.0));
    let history = [1u32, 2, 3];
    for _ in 0..3 {
        a.sample(&logits, &history);
    }
    let mut b = Sampler::new(params(1.0, 0, 1.0, 0.0));
    b.set_rng_state(a.rng_state());
    let next_a: Vec<u32> = (0..20).map(|_| a.sample(&logits, &history)).collect();
    let next_b: Vec<u32> = (0..20).map(|_| b.sample(&logits, &history)).collect();
    assert_eq!(next_a, next_b);
    let mut c = Sampler::new(params(1.0, 0, 1.0, 0.0));
    let next_c: Vec<u32> = (0..20).map(|_| c.sample(&logits, &history)).collect();
    assert_ne!(next_a, next_c, "a fresh generator draws otherwise");
}
