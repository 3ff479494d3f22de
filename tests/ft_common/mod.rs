//! Helpers of the fine-tuning tests: a byte-level tokenizer (257 ids: EOS + 256 bytes), tiny
//! models sized for it, and data files.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use blackmamba::finetune::{FinetuneConfig, Method};
use blackmamba::model::config::Config;
use blackmamba::model::random::{random_weights, RandomInit};
use blackmamba::model::Model;
use candle_core::{DType, Device};
use tokenizers::Tokenizer;

/// Vocabulary of the tiny models: the byte tokenizer's 257 ids, padded.
pub const VOCAB: usize = 264;

/// GPT-2's byte -> printable character map (so that every byte is one token).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    bs.extend(u32::from('¡')..=u32::from('¬'));
    bs.extend(u32::from('®')..=u32::from('ÿ'));
    let mut map = vec!['\0'; 256];
    for &b in &bs {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    map
}

/// A byte-level BPE tokenizer without merges: id 0 is `<|endoftext|>`, byte b is id b + 1.
pub fn byte_tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), (b + 1).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    });
    Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap()
}

/// A tiny config over the byte vocabulary.
pub fn config(layers: &[&str], d: usize) -> Config {
    let json = serde_json::json!({
        "num_layers": layers.len(), "hidden_size": d, "state_size": 4, "conv_dimension": 4,
        "vocab_size": VOCAB, "expansion_factor": 2, "mamba_moe_layers": layers,
        "ffn_hidden_size": 16, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 2048
    });
    Config::from_json_str(&json.to_string()).unwrap()
}

/// Random weights (plain init unless `perturb`).
pub fn model(cfg: &Config, seed: u64, perturb: bool) -> Model {
    let w = random_weights(cfg, RandomInit { seed, perturb }, DType::F32, &Device::Cpu).unwrap();
    Model::from_tensors(cfg, w, DType::F32, &Device::Cpu).unwrap()
}

/// Some English to learn.
pub const TEXT: &str = "The cat sat on the mat. The dog sat on the log. \
The cat and the dog sat on the mat and the log. A bird sang in the tree. \
The bird and the cat sat in the sun. The dog ran to the tree and the bird flew away.\n";

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A small chat JSONL file.
pub fn chat_jsonl() -> String {
    let mut s = String::new();
    for (q, a) in [
        ("Hi", "Hello there."),
        ("What sat on the mat?", "The cat sat on the mat."),
        ("Where did the dog sit?", "The dog sat on the log."),
        ("Who sang?", "A bird sang in the tree."),
        ("Hello", "Hi, how are you?"),
        ("Where is the bird?", "The bird is in the tree."),
    ] {
        s.push_str(&serde_json::json!({"prompt": q, "response": a}).to_string());
        s.push('\n');
        s.push_str(&serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string());
        s.push('\n');
    }
    s
}

/// A config for a short run on `data` into `out`.
pub fn run_config(data: PathBuf, out: PathBuf, method: Method, steps: usize) -> FinetuneConfig {
    FinetuneConfig {
        data,
        method,
        out,
        steps,
        seq_len: 32,
        batch: 4,
        rank: 4,
        alpha: 8.0,
        lr: 3e-3,
        warmup: 2,
        eval_fraction: 0.1,
        ..FinetuneConfig::default()
    }
}
