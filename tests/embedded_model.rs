//! The embedded default model: it loads from the binary, writes English, answers in the chat
//! template, and is far better than chance on English it never saw.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;

use blackmamba::generate::generate;
use blackmamba::loader::{load, LoadOpts, ModelSource};
use blackmamba::model::Logits;
use blackmamba::sampling::SamplingParams;
use candle_core::{DType, Device, Tensor, D};

fn embedded() -> blackmamba::loader::Loaded {
    load(&ModelSource::Embedded, &Device::Cpu, DType::F32, &LoadOpts::default()).unwrap()
}

/// Mean next-token cross-entropy (nats) of `text` under the model.
fn loss_on(l: &blackmamba::loader::Loaded, text: &str) -> f32 {
    let ids = blackmamba::tokenizer::encode(&l.tokenizer, text).unwrap();
    let m = &l.model;
    let x = Tensor::from_slice(&ids[..ids.len() - 1], (1, ids.len() - 1), &Device::Cpu).unwrap();
    let logits = m
        .forward(&x, &mut m.new_state(1).unwrap(), Logits::All, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let tgt = Tensor::from_slice(&ids[1..], (ids.len() - 1, 1), &Device::Cpu).unwrap();
    -lsm.gather(&tgt, 1).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn it_is_trained_not_random() {
    let l = embedded();
    assert!(!l.untrained);
    assert_eq!(l.label, "embedded");
    // a text written for the docs, never seen in training: a random model scores ln 8192 ≈ 9.0
    let text = include_str!("../docs/analysis-sample.txt");
    let loss = loss_on(&l, text);
    assert!(
        loss < 5.5,
        "held-out loss {loss} (perplexity {:.0}) is no better than a barely trained model",
        loss.exp()
    );
}

fn words_ok(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let ok = words
        .iter()
        .filter(|w| {
            w.trim_matches(|c: char| c.is_ascii_punctuation())
                .chars()
                .all(|c| c.is_alphabetic() || c == '\'')
        })
        .count();
    ok as f64 / words.len().max(1) as f64
}

#[test]
fn it_writes_prose_and_answers_in_the_chat_template() {
    let l = embedded();
    let cancel = AtomicBool::new(false);
    let params = SamplingParams {
        temperature: 0.7,
        seed: 1,
        max_tokens: 48,
        stop: vec![],
        ..Default::default()
    };
    let run = |prompt: &str, params: &SamplingParams| {
        let ids = blackmamba::tokenizer::encode(&l.tokenizer, prompt).unwrap();
        let mut st = l.model.new_state(1).unwrap();
        generate(&l.model, &l.tokenizer, &mut st, &ids, params, false, &cancel, |_| Ok(())).unwrap()
    };
    let prose = run("The history of the United States", &params);
    assert!(
        prose.tokens.len() >= 16,
        "prose stopped after {} tokens: {:?}",
        prose.tokens.len(),
        prose.text
    );
    assert!(!prose.text.contains('\u{FFFD}'));
    assert!(words_ok(&prose.text) > 0.8, "not mostly words: {:?}", prose.text);

    let chat = SamplingParams {
        stop: blackmamba::chat_template::STOP_STRINGS.iter().map(|s| s.to_string()).collect(),
        ..params
    };
    let ids = blackmamba::chat_template::prompt_for_turn(&l.tokenizer, None, "How are you today?", true).unwrap();
    let mut st = l.model.new_state(1).unwrap();
    let answer = generate(&l.model, &l.tokenizer, &mut st, &ids, &chat, false, &cancel, |_| Ok(())).unwrap();
    assert!(!answer.text.trim().is_empty(), "no answer");
    assert!(words_ok(&answer.text) > 0.6, "not mostly words: {:?}", answer.text);
}
