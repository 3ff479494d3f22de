//! Activation recomputation (`finetune::recompute`): a trainer that recomputes each layer in the
//! backward pass takes the same steps as one that keeps the whole graph: the same loss, gradient
//! norm, routing and updated weights, for every method (the embedding and head included with
//! `full`, the routers with `router`), with Sinkhorn routing and gradient accumulation.

#![allow(clippy::unwrap_used)]

mod ft_common;

use blackmamba::finetune::data::{self, DataFormat};
use blackmamba::finetune::{Method, Recompute, Trainer};
use ft_common::{byte_tokenizer, config, model, run_config, write, TEXT, VOCAB};

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn recomputed_steps_equal_whole_graph_steps_for_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["r", "4", "r", "4", "r", "4"], 16);
    let base = model(&cfg, 11, true);
    let tok = byte_tokenizer();
    let data_path = write(dir.path(), "t.txt", &TEXT.repeat(3));
    for method in [Method::Lora, Method::Router, Method::Full] {
        let mut fc = run_config(data_path.clone(), dir.path().join("unused"), method, 3);
        fc.grad_accum = 2;
        fc.train_router = method == Method::Lora;
        let ds = data::load(&data_path, DataFormat::Auto, &tok, fc.seq_len, VOCAB).unwrap();
        let (train, _) = data::split(ds.examples, fc.eval_fraction, fc.seed);
        let run = |recompute: Recompute| {
            let mut c = fc.clone();
            c.recompute = recompute;
            let mut t = Trainer::in_memory(&base, &tok, c, train.clone()).unwrap();
            let reports: Vec<_> = (0..3).map(|_| t.step().unwrap()).collect();
            let weights: Vec<(String, Vec<f32>)> = t
                .model()
                .unwrap()
                .named_tensors()
                .unwrap()
                .into_iter()
                .map(|(n, w)| (n, w.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
            (reports, weights)
        };
        let (kept, w_kept) = run(Recompute::Off);
        let (again, w_again) = run(Recompute::On);
        for (a, b) in again.iter().zip(&kept) {
            let what = format!("{method:?} step {}", a.step);
            assert!(
                (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
                "{what}: loss {} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-5 * b.grad_norm,
                "{what}: gradient norm {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
            assert_eq!(a.expert_load, b.expert_load, "{what}: routing");
        }
        let init = base.named_tensors().unwrap();
        let mut moved = 0;
        assert_eq!(w_again.len(), w_kept.len());
        for ((n, a), (_, b)) in w_again.iter().zip(&w_kept) {
            let r = max_rel(a, b);
            assert!(r <= 1e-4, "{method:?}: {n} differs by {r} (relative to its largest value)");
            // trained: a base weight that changed, or a LoRA B (zero at the start) that is not zero
            moved += usize::from(match init.iter().find(|(m, _)| m == n) {
                Some((_, w0)) => max_rel(&w0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b) > 0.0,
                None => n.ends_with("lora_b") && b.iter().any(|x| *x != 0.0),
            });
        }
        assert!(moved > 0, "{method:?}: no weight moved, so the comparison saw nothing");
    }
}
