//! The DPO (sigmoid) and IPO losses on the tiny-a fixture: loss and gradient against a direct
//! computation (host log-softmax sums; central differences), and a pair whose chosen and rejected
//! responses are identical gives a zero gradient.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use blackmamba::finetune::dpo::{pref_loss, sequence_logprobs, PrefLoss};
use blackmamba::loader::load_dir;
use blackmamba::model::{Kernels, Logits, Model};
use candle_core::{DType, Device, Tensor, Var};

fn tiny_a() -> Model {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"));
    let mut m = load_dir(dir, &Device::Cpu, DType::F32).unwrap().0;
    m.kernels = Kernels::off();
    m
}

/// (prompt, response) -> ids and the response mask
fn seq(prompt: &[u32], resp: &[u32], len: usize) -> (Vec<u32>, Vec<f32>) {
    let mut ids = [prompt, resp].concat();
    let mut mask: Vec<f32> = (0..ids.len()).map(|i| if i >= prompt.len() { 1.0 } else { 0.0 }).collect();
    ids.resize(len, 0);
    mask.resize(len, 0.0);
    (ids, mask)
}

fn batch(rows: &[(Vec<u32>, Vec<f32>)]) -> (Tensor, Tensor) {
    let len = rows[0].0.len();
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.0.clone()).collect();
    let mask: Vec<f32> = rows.iter().flat_map(|r| r.1.clone()).collect();
    (
        Tensor::from_vec(ids, (rows.len(), len), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (rows.len(), len), &Device::Cpu).unwrap(),
    )
}

/// Host computation: one forward per sequence, log-softmax in f64, summed over the response.
fn direct_logprob(m: &Model, prompt: &[u32], resp: &[u32]) -> f64 {
    let ids = [prompt, resp].concat();
    let mut st = m.new_state(1).unwrap();
    let l = m
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
    (prompt.len()..ids.len())
        .map(|t| {
            let row = &l[t - 1];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            row[ids[t] as usize] as f64 - lse
        })
        .sum()
}

const PROMPTS: [&[u32]; 2] = [&[3, 9, 27, 81], &[100, 7]];
const CHOSEN: [&[u32]; 2] = [&[5, 6, 7], &[44, 45, 46, 47]];
const REJECTED: [&[u32]; 2] = [&[8, 9], &[300, 301, 2]];
const REF: ([f64; 2], [f64; 2]) = ([-20.0, -26.5], [-14.0, -19.0]);

/// The loss through the crate with `m` (its embedding `var`), for pairs (chosen, rejected).
fn loss_of(m: &Model, chosen: [&[u32]; 2], rejected: [&[u32]; 2], beta: f64, kind: PrefLoss) -> (Tensor, f64) {
    let rows: Vec<_> = (0..2)
        .map(|i| seq(PROMPTS[i], chosen[i], 8))
        .chain((0..2).map(|i| seq(PROMPTS[i], rejected[i], 8)))
        .collect();
    let (ids, mask) = batch(&rows);
    let lp = sequence_logprobs(m, &ids, &mask).unwrap();
    let t = |v: [f64; 2]| Tensor::new(&[v[0] as f32, v[1] as f32], &Device::Cpu).unwrap();
    let out = pref_loss(
        &lp.narrow(0, 0, 2).unwrap(),
        &lp.narrow(0, 2, 2).unwrap(),
        &t(REF.0),
        &t(REF.1),
        beta,
        kind,
    )
    .unwrap();
    let v = out.loss.to_scalar::<f32>().unwrap() as f64;
    (out.loss, v)
}

fn direct_loss(m: &Model, beta: f64, kind: PrefLoss) -> f64 {
    let mut sum = 0.0;
    for i in 0..2 {
        let h = (direct_logprob(m, PROMPTS[i], CHOSEN[i]) - REF.0[i]) - (direct_logprob(m, PROMPTS[i], REJECTED[i]) - REF.1[i]);
        sum += match kind {
            PrefLoss::Sigmoid => -(1.0 / (1.0 + (-beta * h).exp())).ln(),
            PrefLoss::Ipo => (h - 1.0 / (2.0 * beta)).powi(2),
        };
    }
    sum / 2.0
}

fn with_embedding(base: &Model, w: &Tensor) -> Model {
    let mut m = base.clone();
    m.embedding = w.clone();
    m.differentiable = true;
    m
}

#[test]
fn loss_and_gradient_match_a_direct_computation() {
    let base = tiny_a();
    for (kind, beta) in [(PrefLoss::Sigmoid, 0.1), (PrefLoss::Ipo, 0.5)] {
        let var = Var::from_tensor(&base.embedding).unwrap();
        let m = with_embedding(&base, var.as_tensor());
        let (loss, v) = loss_of(&m, CHOSEN, REJECTED, beta, kind);
        let d = direct_loss(&base, beta, kind);
        assert!((v - d).abs() < 1e-4 * d.abs().max(1.0), "{kind:?}: loss {v} vs direct {d}");
        let g = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // central differences on the three embedding entries with the largest gradient
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let w0 = base.embedding.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dims = base.embedding.dims().to_vec();
        for &k in &idx[..3] {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut w = w0.clone();
                w[k] += delta;
                let m = with_embedding(&base, &Tensor::from_vec(w, dims.as_slice(), &Device::Cpu).unwrap());
                direct_loss(&m, beta, kind)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            assert!(
                (g[k] as f64 - fd).abs() < 0.05 * fd.abs() + 1e-4,
                "{kind:?}: d loss / d w[{k}] = {} vs central difference {fd}",
                g[k]
            );
        }
    }
}

#[test]
fn an_identical_pair_gives_a_zero_gradient() {
    let base = tiny_a();
    for kind in [PrefLoss::Sigmoid, PrefLoss::Ipo] {
        let var = Var::from_tensor(&base.embedding).unwrap();
        let m = with_embedding(&base, var.as_tensor());
        let max_grad = |chosen, rejected| {
            let (loss, _) = loss_of(&m, chosen, rejected, 0.1, kind);
            let g = loss
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            g.to_scalar::<f32>().unwrap()
        };
        let different = max_grad(CHOSEN, REJECTED);
        let same = max_grad(CHOSEN, CHOSEN);
        assert!(different > 1e-3, "{kind:?}: a real pair must move the weights ({different})");
        assert!(
            same <= 1e-6 * different,
            "{kind:?}: identical pair, max |grad| {same} (real pair {different})"
        );
    }
}

#[test]
fn rewards_margin_and_accuracy() {
    let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    let out = pref_loss(
        &t(&[-1.0, -2.0]),
        &t(&[-3.0, -1.0]),
        &t(&[-2.0, -2.0]),
        &t(&[-2.0, -2.0]),
        0.5,
        PrefLoss::Sigmoid,
    )
    .unwrap();
    // chosen rewards 0.5·(1, 0), rejected 0.5·(−1, 1)
    assert!((out.reward_chosen - 0.25).abs() < 1e-6 && (out.reward_rejected - 0.0).abs() < 1e-6);
    assert!((out.margin - 0.25).abs() < 1e-6 && (out.accuracy - 0.5).abs() < 1e-9);
    assert!(pref_loss(&t(&[0.0]), &t(&[0.0]), &t(&[0.0]), &t(&[0.0]), 0.0, PrefLoss::Ipo).is_err());
    assert_eq!(PrefLoss::parse("ipo").unwrap(), PrefLoss::Ipo);
    assert!(PrefLoss::parse("kto").is_err());
}

#[test]
fn padded_pair_batches_score_each_side_as_alone_and_the_reference_is_batch_independent() {
    use blackmamba::finetune::dpo::{pair_logprobs, reference_logprobs};
    use blackmamba::finetune::prefs::parse;
    // the embedded model and its tokenizer (the chat template's ids are beyond tiny-a's 512)
    let (m, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let text = "{\"prompt\": \"a b\", \"chosen\": \"c d e f g\", \"rejected\": \"h\"}\n{\"prompt\": \"i j k l m n\", \"chosen\": \"o\", \"rejected\": \"p q r\"}\n";
    let set = parse(text, &tok, 64).unwrap();
    assert_eq!(set.pairs.len(), 2, "{:?}", set.bad);
    let (c, r) = pair_logprobs(&m, &set.pairs).unwrap();
    let (c, r) = (c.to_vec1::<f32>().unwrap(), r.to_vec1::<f32>().unwrap());
    for (i, p) in set.pairs.iter().enumerate() {
        for (got, e) in [(c[i], &p.chosen), (r[i], &p.rejected)] {
            let start = e.mask.iter().position(|&x| x).unwrap();
            assert!(e.mask[start..].iter().take_while(|&&x| x).count() > 0);
            let end = start + e.mask[start..].iter().take_while(|&&x| x).count();
            let d = direct_logprob(&m, &e.ids[..start], &e.ids[start..end]);
            assert!((got as f64 - d).abs() < 1e-4, "pair {i}: {got} vs direct {d}");
        }
    }
    let one = reference_logprobs(&m, &set.pairs, 1).unwrap();
    let two = reference_logprobs(&m, &set.pairs, 2).unwrap();
    for (a, b) in one.iter().zip(&two) {
        assert!((a.0 - b.0).abs() < 1e-4 && (a.1 - b.1).abs() < 1e-4, "{one:?} vs {two:?}");
    }
    assert!((one[0].0 - c[0]).abs() < 1e-4);
}
