//! The transformer families behind `--model` (issue 19): the family from config.json's
//! model_type, `logits`, `generate` and `trace` on the tiny OLMoE and Mixtral fixtures of
//! scripts/moe_fixtures.py against transformers' outputs and the in-process model, streaming past
//! the context, and BlackMamba-only commands refusing a transformer folder in one line.

#![allow(clippy::unwrap_used)]

mod common;

use common::max_abs;

use std::path::{Path, PathBuf};
use std::process::Command;

use blackmamba::commands::logits::transformer_forced;
use blackmamba::lm::{family_of, load_any, run, AnyModel};
use blackmamba::loader::{LoadOpts, ModelSource};
use blackmamba::moe_lm::weights::random_tensors;
use blackmamba::moe_lm::{Family, MoeConfig, MoeLm};
use candle_core::{DType, Device, Tensor};

fn bm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackmamba"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids_of(exp: &std::collections::HashMap<String, Tensor>) -> Vec<u32> {
    exp["ids"].to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

#[test]
fn the_family_comes_from_model_type() {
    assert_eq!(family_of(&fixture("olmoe-tiny")).unwrap(), Some(Family::Olmoe));
    assert_eq!(family_of(&fixture("mixtral-tiny")).unwrap(), Some(Family::Mixtral));
    assert_eq!(family_of(&fixture("tiny-a")).unwrap(), None, "a BlackMamba folder");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = family_of(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("'llama'") && e.contains("mixtral"), "{e}");

    let opts = LoadOpts::default();
    for (name, family) in [("olmoe-tiny", "olmoe"), ("mixtral-tiny", "mixtral")] {
        let l = load_any(&ModelSource::Dir(fixture(name)), &Device::Cpu, DType::F32, &opts).unwrap();
        assert_eq!(l.model.family(), family);
        assert_eq!(l.eos, vec![2], "{name}: eos_token_id of the config");
    }
    let l = load_any(&ModelSource::Embedded, &Device::Cpu, DType::F32, &opts).unwrap();
    assert!(matches!(l.model, AnyModel::BlackMamba(_)));
    // a transformer folder without tokenizer.json: one line naming the folder and the fix
    let bare = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("olmoe-tiny").join(f), bare.path().join(f)).unwrap();
    }
    let e = load_any(&ModelSource::Dir(bare.path().into()), &Device::Cpu, DType::F32, &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("--tokenizer"), "{e}");
}

#[test]
fn logits_match_transformers_full_and_cached() {
    for name in ["olmoe-tiny", "mixtral-tiny"] {
        let exp = expected(name);
        let ids = ids_of(&exp);
        let m = MoeLm::load(&fixture(name), &Device::Cpu, DType::F32).unwrap();
        for step in [false, true] {
            let (logits, experts, probs) = transformer_forced(&m, &ids, step).unwrap();
            let d = max_abs(&logits, &exp["logits"]);
            assert!(d < 1e-4, "{name} step={step}: max |Δ logits| {d}");
            let dp = max_abs(&probs, &exp["router_probs"]);
            assert!(dp < 1e-5, "{name} step={step}: max |Δ router probs| {dp}");
            let mut got: Vec<Vec<Vec<i64>>> = experts.to_vec3().unwrap();
            got.iter_mut().flatten().for_each(|s| s.sort_unstable());
            assert_eq!(
                got,
                exp["topk_experts"].to_vec3::<i64>().unwrap(),
                "{name} step={step}: expert sets"
            );
        }
    }
}

#[test]
fn the_logits_command_writes_transformers_numbers() {
    let exp = expected("mixtral-tiny");
    let ids: Vec<String> = ids_of(&exp).iter().map(u32::to_string).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let o = bm()
        .args([
            "--model",
            fixture("mixtral-tiny").to_str().unwrap(),
            "logits",
            "--step",
            "--ids",
            &ids.join(","),
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(max_abs(&got["logits"], &exp["logits"]) < 1e-4);
    assert_eq!(got["experts"].dims(), &[2, 320, 2]);
    assert_eq!(got["router_probs"].dims(), &[2, 320, 8]);
}

#[test]
fn generate_decodes_with_the_cache_as_the_model_does() {
    let dir = fixture("olmoe-tiny");
    let prompt = "The router sends each token to its experts.";
    let o = bm()
        .args(["--model", dir.to_str().unwrap(), "generate", "--prompt", prompt])
        .args(["--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "10", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let l = load_any(&ModelSource::Dir(dir.clone()), &Device::Cpu, DType::F32, &LoadOpts::default()).unwrap();
    let AnyModel::Transformer(m) = &l.model else {
        panic!("not a transformer")
    };
    let ids = blackmamba::tokenizer::encode(&l.tokenizer, prompt).unwrap();
    let params = blackmamba::sampling::SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..Default::default()
    };
    let mut sampler = blackmamba::sampling::Sampler::new(params);
    let want = blackmamba::moe_lm::decode::generate(m, &mut m.new_cache(), &ids, &mut sampler, 10, Some(2), &mut |_, _| {}).unwrap();
    let n = want.iter().position(|&t| t == 2).unwrap_or(want.len());
    let text = blackmamba::tokenizer::decode(&l.tokenizer, &want[..n]).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), text);
    assert_eq!(v["generated_tokens"].as_u64().unwrap() as usize, n);
    assert_eq!(v["stop"], if n < 10 { "Eos" } else { "MaxTokens" });
    assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
}

#[test]
fn trace_writes_top_k_sets_and_the_windowed_cache() {
    let dir = fixture("mixtral-tiny");
    let text = "Sliding windows keep the cache short: ".repeat(12);
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("t.jsonl");
    let o = bm()
        .args(["--model", dir.to_str().unwrap(), "trace", "--chunk", "17", "--prompt", &text])
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs: Vec<blackmamba::analysis::trace::TokenRecord> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let l = load_any(&ModelSource::Dir(dir), &Device::Cpu, DType::F32, &LoadOpts::default()).unwrap();
    let AnyModel::Transformer(m) = &l.model else {
        panic!("not a transformer")
    };
    let ids = blackmamba::tokenizer::encode(&l.tokenizer, &text).unwrap();
    assert!(ids.len() > 64, "the text passes the window: {} tokens", ids.len());
    assert_eq!(recs.len(), ids.len());
    let (_, probe) = m.forward(&ids, &mut m.new_cache()).unwrap();
    for (t, r) in recs.iter().enumerate() {
        assert_eq!(r.id, ids[t]);
        assert_eq!(r.kv_len, Some((t + 1).min(63)), "token {t}: the cache keeps window − 1");
        for (layer, e) in r.moe.iter().enumerate() {
            assert_eq!(e.experts, probe[layer].routing.experts_of(t), "token {t} layer {layer}");
            assert_eq!(e.expert, e.experts[0]);
            let h = probe[layer].routing.entropy[t];
            assert!((e.entropy.unwrap() - h).abs() < 1e-4, "chunked entropy {:?} vs {h}", e.entropy);
        }
    }
}

#[test]
fn streaming_past_the_context_starts_a_fresh_cache() {
    let json = r#"{"model_type": "olmoe", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "rope_theta": 10000.0, "max_position_embeddings": 16}"#;
    let cfg = MoeConfig::from_json(json).unwrap();
    let w = random_tensors(&cfg, 3, 0.2).unwrap();
    let m = AnyModel::Transformer(Box::new(MoeLm::from_source(cfg, &w, &Device::Cpu, DType::F32).unwrap()));
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 64) as u32).collect();
    let mut seen = Vec::new();
    let s = run::stream(&m, &ids, 7, &mut |c| {
        assert!(
            c.seq_pos + c.ids.len() <= 16,
            "chunk at {} runs to {}",
            c.start,
            c.seq_pos + c.ids.len()
        );
        assert_eq!(c.probe.moe[0].tokens(), c.ids.len());
        seen.push((c.start, c.seq_pos));
        Ok(())
    })
    .unwrap();
    assert_eq!(s.tokens, 40);
    assert_eq!(seen, vec![(0, 0), (7, 7), (14, 0), (21, 7), (28, 0), (35, 7)]);
    assert_eq!(s.resets, 2);
}

#[test]
fn blackmamba_only_commands_refuse_a_transformer_folder_in_one_line() {
    let dir = fixture("olmoe-tiny");
    let o = bm().args(["--model", dir.to_str().unwrap(), "check"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model_type 'olmoe'") && err.contains("generate, logits, trace"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn the_tui_records_of_a_transformer_carry_all_k_experts() {
    let l = load_any(
        &ModelSource::Dir(fixture("olmoe-tiny")),
        &Device::Cpu,
        DType::F32,
        &LoadOpts::default(),
    )
    .unwrap();
    let AnyModel::Transformer(m) = &l.model else {
        panic!("not a transformer")
    };
    let ids = [5u32, 9, 300, 41];
    let (_, layers) = m.forward(&ids, &mut m.new_cache()).unwrap();
    let probe = blackmamba::lm::probe::SharedProbe::from_transformer(&layers);
    let recs = blackmamba::engine::telemetry::records_shared(&l.tokenizer, &ids, 10, false, Some(&probe));
    assert_eq!(recs.len(), 4);
    for (t, r) in recs.iter().enumerate() {
        assert_eq!(r.pos, 10 + t);
        for (layer, p) in layers.iter().enumerate() {
            let want = p.routing.experts_of(t);
            assert_eq!(u32::from(r.routes[layer].expert), want[0]);
            let more: Vec<u32> = r.more[layer].iter().map(|&(e, _)| u32::from(e)).collect();
            assert_eq!(more, &want[1..], "token {t} layer {layer}");
            assert!(r.more[layer].windows(2).all(|w| w[0].1 >= w[1].1), "best first");
        }
    }
    // a probe of other tokens gives records without telemetry
    let none = blackmamba::engine::telemetry::records_shared(&l.tokenizer, &ids[..2], 0, false, Some(&probe));
    assert!(none.iter().all(|r| r.routes.is_empty() && r.more.is_empty()));
}
