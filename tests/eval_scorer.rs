//! The log-likelihood primitive: with the context's state shared among the choices it equals the
//! sum of the full forward's log-probs (f32, 1e-4) on the tiny-a fixture and the embedded model;
//! and lm-eval's tokenisation of a (context, continuation) pair.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use blackmamba::eval::scorer::{encode_pair, loglikelihood, loglikelihood_full, LogLik};
use blackmamba::loader::load_dir;
use blackmamba::model::{Logits, Model};
use blackmamba::rng::Rng;
use blackmamba::tokenizer::encode;
use candle_core::{DType, Device, Tensor};

fn tiny_a() -> Model {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"));
    load_dir(dir, &Device::Cpu, DType::F32).unwrap().0
}

/// The direct computation: one full forward over context + continuation, log-softmax on the host.
fn direct(m: &Model, ctx: &[u32], cont: &[u32]) -> LogLik {
    let ids: Vec<u32> = [ctx, cont].concat();
    let mut st = m.new_state(1).unwrap();
    let logits = m
        .forward(
            &Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap(),
            &mut st,
            Logits::All,
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut sum = 0.0f64;
    let mut greedy = true;
    for (j, &t) in cont.iter().enumerate() {
        let row = &logits[ctx.len() - 1 + j];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        sum += row[t as usize] as f64 - lse;
        let best = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
        greedy &= best == t as usize;
    }
    LogLik {
        logprob: sum,
        greedy,
        tokens: cont.len(),
    }
}

fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn check_model(m: &Model, seed: u64) {
    let mut rng = Rng::new(seed);
    let vocab = m.cfg.vocab_size;
    for (ctx_len, lens) in [(1, vec![1, 1]), (7, vec![3, 1, 5, 2]), (12, vec![6]), (5, vec![1, 9, 4])] {
        let ctx = random_ids(&mut rng, ctx_len, vocab);
        let conts: Vec<Vec<u32>> = lens.iter().map(|&n| random_ids(&mut rng, n, vocab)).collect();
        let shared = loglikelihood(m, &ctx, &conts).unwrap();
        let full = loglikelihood_full(m, &ctx, &conts).unwrap();
        for (i, c) in conts.iter().enumerate() {
            let d = direct(m, &ctx, c);
            for (what, got) in [("state reuse", shared[i]), ("full batch", full[i])] {
                assert!(
                    (got.logprob - d.logprob).abs() < 1e-4,
                    "{what}: ctx {ctx_len}, choice {i} ({} tokens): {} vs direct {}",
                    c.len(),
                    got.logprob,
                    d.logprob
                );
                assert_eq!(got.greedy, d.greedy, "{what}: ctx {ctx_len}, choice {i}: greedy");
                assert_eq!(got.tokens, c.len());
            }
        }
    }
}

#[test]
fn shared_state_equals_the_full_forward_on_the_tiny_a_fixture() {
    check_model(&tiny_a(), 1);
}

#[test]
fn shared_state_equals_the_full_forward_on_the_embedded_model() {
    let (m, _) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    check_model(&m, 2);
}

#[test]
fn a_greedy_continuation_is_reported_greedy() {
    // Build the continuation from the model's own argmax, so `greedy` must hold, and break it.
    let m = tiny_a();
    let ctx = vec![5u32, 17, 200];
    let mut ids = ctx.clone();
    for _ in 0..4 {
        let mut st = m.new_state(1).unwrap();
        let l = m
            .forward(
                &Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap(),
                &mut st,
                Logits::Last,
                None,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let best = l.iter().enumerate().fold(0, |b, (i, &x)| if x > l[b] { i } else { b });
        ids.push(best as u32);
    }
    let cont = ids[ctx.len()..].to_vec();
    let mut other = cont.clone();
    other[2] = (other[2] + 1) % 512;
    let r = loglikelihood(&m, &ctx, &[cont, other]).unwrap();
    assert!(r[0].greedy && !r[1].greedy, "{r:?}");
    assert!(r[0].logprob > r[1].logprob);
}

#[test]
fn empty_inputs_are_refused() {
    let m = tiny_a();
    assert!(loglikelihood(&m, &[], &[vec![1]]).is_err());
    assert!(loglikelihood(&m, &[1], &[vec![]]).is_err());
    assert!(loglikelihood_full(&m, &[1], &[]).is_err());
}

#[test]
fn the_pair_is_tokenised_as_lm_eval_does() {
    let tok = blackmamba::tokenizer::neox().unwrap();
    let enc = |s: &str| encode(&tok, s).unwrap();
    // Trailing spaces of the context move to the continuation.
    let (ctx, conts) = encode_pair(&tok, 0, "Question: Is it?\nAnswer: ", &["yes".into(), "no way".into()]).unwrap();
    assert_eq!(ctx, enc("Question: Is it?\nAnswer:"));
    assert_eq!(conts[0], enc(" yes"));
    assert_eq!(conts[1], enc(" no way"));
    // The continuation is whatever follows the context's token count in the joint encoding, even
    // where the joint encoding merges across the boundary.
    let (ctx, conts) = encode_pair(&tok, 0, "The quick bro", &["wn fox".into()]).unwrap();
    let whole = enc("The quick brown fox");
    assert_eq!(ctx, enc("The quick bro"));
    assert_eq!(conts[0], whole[ctx.len()..].to_vec());
    assert_ne!(conts[0], enc("wn fox"), "the test needs a pair that merges across the boundary");
    // An empty context is the end-of-text token.
    let (ctx, conts) = encode_pair(&tok, 0, "", &[" Hello".into()]).unwrap();
    assert_eq!(ctx, vec![0]);
    assert_eq!(conts[0], enc(" Hello"));
    // A continuation with no tokens of its own is an error that names it.
    let e = encode_pair(&tok, 0, "abc", &[String::new()]).unwrap_err().to_string();
    assert!(e.contains("continuation"), "{e}");
}
