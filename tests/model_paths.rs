//! Full-sequence == prefill + steps on random configs (several layer patterns, 2..8 experts),
//! batches, the chunked scan across chunk borders, and a state carried between calls.

#![allow(clippy::unwrap_used)]

mod common;

use blackmamba::model::Logits;
use candle_core::{Device, Tensor};
use common::{max_abs, random_ids, tiny_config, tiny_model};

fn check_paths(layers: &[&str], seed: u64, len: usize) {
    let cfg = tiny_config(layers, 32, 97);
    let m = tiny_model(&cfg, seed);
    let ids = random_ids(len, cfg.vocab_size, seed + 100);
    let dev = Device::Cpu;
    let mut st = m.new_state(1).unwrap();
    let full = m
        .forward(&Tensor::from_slice(&ids, (1, len), &dev).unwrap(), &mut st, Logits::All, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for p in [1, 2, 3, 4, len / 2, len - 1] {
        let mut st = m.new_state(1).unwrap();
        let mut rows = vec![m
            .forward(&Tensor::from_slice(&ids[..p], (1, p), &dev).unwrap(), &mut st, Logits::All, None)
            .unwrap()
            .squeeze(0)
            .unwrap()];
        for &id in &ids[p..] {
            rows.push(m.step(&Tensor::from_slice(&[id], 1, &dev).unwrap(), &mut st, None).unwrap());
        }
        let d = max_abs(&Tensor::cat(&rows, 0).unwrap(), &full);
        assert!(d < 5e-4, "{layers:?}: prefix {p} of {len}: max |Δ| = {d}");
    }
}

#[test]
fn paths_agree_on_many_layer_patterns() {
    check_paths(&["r", "8", "r", "8"], 1, 40);
    check_paths(&["r", "2", "r", "3", "r", "5"], 2, 23);
    check_paths(&["8", "r", "r", "4"], 3, 17);
    check_paths(&["r", "1", "r", "6"], 4, 19);
    check_paths(&["r", "r", "7"], 5, 9);
}

#[test]
fn long_sequences_cross_scan_chunks() {
    // 150 tokens = three chunks of the scan
    check_paths(&["r", "8"], 6, 150);
}

#[test]
fn continuing_a_state_equals_one_long_call() {
    let cfg = tiny_config(&["r", "4", "r", "4"], 32, 61);
    let m = tiny_model(&cfg, 7);
    let ids = random_ids(90, 61, 8);
    let dev = Device::Cpu;
    let mut st = m.new_state(1).unwrap();
    let full = m
        .forward(&Tensor::from_slice(&ids, (1, 90), &dev).unwrap(), &mut st, Logits::All, None)
        .unwrap();
    let mut st2 = m.new_state(1).unwrap();
    let a = m
        .forward(&Tensor::from_slice(&ids[..37], (1, 37), &dev).unwrap(), &mut st2, Logits::All, None)
        .unwrap();
    let b = m
        .forward(&Tensor::from_slice(&ids[37..], (1, 53), &dev).unwrap(), &mut st2, Logits::All, None)
        .unwrap();
    let d = max_abs(&Tensor::cat(&[a, b], 1).unwrap(), &full);
    assert!(d < 5e-4, "split prefill: {d}");
    assert_eq!(st2.pos, 90);
    let last = m
        .forward(
            &Tensor::from_slice(&ids[..90], (1, 90), &dev).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::Last,
            None,
        )
        .unwrap();
    assert!(max_abs(&last, &full.narrow(1, 89, 1).unwrap()) < 1e-5);
}

#[test]
fn a_batch_equals_its_rows() {
    let cfg = tiny_config(&["r", "8", "r", "8"], 32, 50);
    let m = tiny_model(&cfg, 9);
    let dev = Device::Cpu;
    let rows: Vec<Vec<u32>> = (0..3).map(|i| random_ids(12, 50, 20 + i)).collect();
    let flat: Vec<u32> = rows.concat();
    let mut st = m.new_state(3).unwrap();
    let batch = m
        .forward(&Tensor::from_slice(&flat, (3, 12), &dev).unwrap(), &mut st, Logits::All, None)
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        let mut s1 = m.new_state(1).unwrap();
        let one = m
            .forward(&Tensor::from_slice(r, (1, 12), &dev).unwrap(), &mut s1, Logits::All, None)
            .unwrap();
        assert!(max_abs(&batch.narrow(0, i, 1).unwrap(), &one) < 1e-4, "row {i}");
    }
    // and the batched step
    let next: Vec<u32> = vec![1, 2, 3];
    let stepped = m.step(&Tensor::from_slice(&next, 3, &dev).unwrap(), &mut st, None).unwrap();
    for (i, r) in rows.iter().enumerate() {
        let mut ids = r.clone();
        ids.push(next[i]);
        let one = m
            .forward(
                &Tensor::from_slice(&ids, (1, 13), &dev).unwrap(),
                &mut m.new_state(1).unwrap(),
                Logits::Last,
                None,
            )
            .unwrap();
        assert!(
            max_abs(&stepped.narrow(0, i, 1).unwrap(), &one.squeeze(1).unwrap()) < 1e-4,
            "step row {i}"
        );
    }
}

#[test]
fn an_id_outside_the_vocabulary_is_an_error_naming_both_numbers() {
    let cfg = tiny_config(&["r", "8"], 32, 50);
    let m = tiny_model(&cfg, 1);
    let e = m.check_ids(&[3, 50]).unwrap_err().to_string();
    assert!(e.contains("50") && e.contains("vocabulary of 50"), "{e}");
}
