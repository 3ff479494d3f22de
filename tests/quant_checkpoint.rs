//! Quantised checkpoints (`blackmamba quantize --out DIR`): written atomically, reloaded with
//! bit-identical logits to quantising at load, and bad ones refused in one line.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use blackmamba::commands::quantize::{run, QuantizeArgs};
use blackmamba::commands::{load, ModelArgs};
use blackmamba::loader::load_dir;
use blackmamba::model::{Logits, Model};
use blackmamba::quant::checkpoint::{read_manifest, save, MANIFEST};
use blackmamba::quant::{quantize_model, Part, QuantFormat, QuantSpec};
use candle_core::{DType, Device, Tensor};

fn fixture() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"))
}

fn logits(m: &Model, ids: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut st = m.new_state(1).unwrap();
    let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let all: Vec<f32> = m
        .forward(&t, &mut st, Logits::All, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let step: Vec<f32> = m
        .step(&Tensor::from_slice(&[ids[0]], 1, &Device::Cpu).unwrap(), &mut st, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (all, step)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn tiny_a_checkpoint_reloads_bit_identical_in_every_format() {
    let m = load_dir(fixture(), &Device::Cpu, DType::F32).unwrap().0;
    let tok = blackmamba::tokenizer::neox().unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 512).collect();
    let cases = [
        (QuantFormat::Int8, vec![], vec![Part::DtProj, Part::ALog, Part::D]),
        (QuantFormat::Fp8, vec![], vec![Part::Router, Part::Conv, Part::Norms]),
        (QuantFormat::Q4 { group: 64 }, vec![Part::Fc2], vec![]),
    ];
    for (f, keep, also) in cases {
        let spec = QuantSpec::new(f, &keep, &also, true).unwrap();
        let mut q = m.clone();
        quantize_model(&mut q, &spec).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let manifest = save(&q, &tok, &spec, dir.path()).unwrap();
        assert_eq!(
            files(dir.path()),
            ["config.json", "model.safetensors", MANIFEST, "tokenizer.json"],
            "{f}: no temp file left"
        );
        let (back, fmt) = read_manifest(dir.path()).unwrap().unwrap();
        assert_eq!((back, fmt), (manifest.clone(), f));
        assert_eq!(
            manifest.quantized.len(),
            6 + 16 * (2 - keep.len()) + 1 + 2 * usize::from(also.contains(&Part::DtProj)) + 2 * usize::from(also.contains(&Part::Router))
        );
        let r = load_dir(dir.path(), &Device::Cpu, DType::F32).unwrap().0;
        assert_eq!(
            logits(&r, &ids),
            logits(&q, &ids),
            "{f}: reloaded logits differ from quantise-at-load"
        );
        assert_ne!(logits(&r, &ids), logits(&m, &ids), "{f}: the reload lost the quantisation");
        let bytes = std::fs::metadata(dir.path().join("model.safetensors")).unwrap().len();
        assert!(
            bytes < 1_597_950 / 2,
            "{f}: {bytes} bytes is not smaller than half the f32 checkpoint"
        );
        // a second --quant of another format on a quantised checkpoint is refused in one line
        let other = QuantSpec::new(
            QuantFormat::Q4 { group: 128 },
            &[Part::InProj, Part::Fc1, Part::Fc2, Part::Embedding],
            &[],
            true,
        )
        .unwrap();
        if f != other.format {
            let mut r2 = r.clone();
            let e = quantize_model(&mut r2, &other).unwrap_err().to_string();
            assert!(e.contains("already quantised") && !e.contains('\n'), "{e}");
        }
    }
}

#[test]
fn bad_quantised_checkpoints_are_one_line_errors() {
    let m = load_dir(fixture(), &Device::Cpu, DType::F32).unwrap().0;
    let spec = QuantSpec::new(QuantFormat::Int8, &[], &[], true).unwrap();
    let mut q = m.clone();
    quantize_model(&mut q, &spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(&q, &blackmamba::tokenizer::neox().unwrap(), &spec, dir.path()).unwrap();
    let manifest = dir.path().join(MANIFEST);
    let good = std::fs::read_to_string(&manifest).unwrap();
    for (bad, want) in [
        (good.replace("\"version\": 1", "\"version\": 2"), "version 2"),
        (good.replace("\"int8\"", "\"q4g64\""), "disagree"),
        (good.replace("\"int8\"", "\"int3\""), "--quant int3"),
        ("{".to_string(), "rewrite it"),
    ] {
        std::fs::write(&manifest, bad).unwrap();
        let e = format!("{}", load_dir(dir.path(), &Device::Cpu, DType::F32).err().unwrap());
        assert!(e.contains(MANIFEST) && e.contains(want) && !e.contains('\n'), "{e}");
    }
    // a manifest that lists fewer matrices than the file holds: the packed ones are unexpected
    let fewer = good.replacen("\"decoder.layers.0.mixer.in_proj\",", "", 1);
    std::fs::write(&manifest, fewer).unwrap();
    let e = format!("{}", load_dir(dir.path(), &Device::Cpu, DType::F32).err().unwrap());
    assert!(e.contains("in_proj.qweight") || e.contains("in_proj.weight"), "{e}");
}

#[test]
fn quantize_command_writes_a_checkpoint_that_loads_like_quant_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4");
    let base = ModelArgs {
        device: Some(blackmamba::loader::DeviceArg::Cpu),
        quant: Some(QuantFormat::Q4 { group: 64 }),
        ..Default::default()
    };
    let args = QuantizeArgs {
        out: Some(out.clone()),
        compare: false,
        text: None,
        window: 64,
        json: None,
        gptq: None,
        gptq_damp: 0.01,
    };
    run(&base, &args).unwrap();
    let at_load = load(&base).unwrap();
    let reloaded = load(&ModelArgs {
        model: Some(out.display().to_string()),
        device: Some(blackmamba::loader::DeviceArg::Cpu),
        ..Default::default()
    })
    .unwrap();
    let ids = blackmamba::tokenizer::encode(&reloaded.tokenizer, "The harbour was quiet before dawn.").unwrap();
    assert_eq!(logits(&reloaded.model, &ids), logits(&at_load.model, &ids));
    // the same format again on the checkpoint is a no-op, not a second rounding
    let again = load(&ModelArgs {
        model: Some(out.display().to_string()),
        ..base.clone()
    })
    .unwrap();
    assert_eq!(logits(&again.model, &ids), logits(&at_load.model, &ids));
    // --no-kernels: the same checkpoint on the dequantise-then-matmul twin, close but not equal
    let mut twin_args = base.clone();
    twin_args.kernels.no_kernels = true;
    let twin = load(&twin_args).unwrap();
    let (a, b) = (logits(&twin.model, &ids).0, logits(&at_load.model, &ids).0);
    assert_ne!(a, b, "--no-kernels should leave the GGML matmul");
    let e = run(&ModelArgs::default(), &args).unwrap_err().to_string();
    assert!(e.contains("--quant FORMAT"), "{e}");
}

#[test]
fn quantize_compare_reports_routing_drift_of_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let n_moe = blackmamba::embedded::load(&Device::Cpu, DType::F32)
        .unwrap()
        .0
        .cfg
        .moe_layers()
        .len();
    let mut shares = Vec::new();
    for f in [QuantFormat::Int8, QuantFormat::Fp8, QuantFormat::Q4 { group: 64 }] {
        let json = dir.path().join(format!("{f}.json"));
        let m = ModelArgs {
            device: Some(blackmamba::loader::DeviceArg::Cpu),
            quant: Some(f),
            ..Default::default()
        };
        let a = QuantizeArgs {
            out: None,
            compare: true,
            text: None,
            window: 64,
            json: Some(json.clone()),
            gptq: None,
            gptq_damp: 0.01,
        };
        run(&m, &a).unwrap();
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r["format"], f.name());
        let tokens = r["tokens"].as_u64().unwrap();
        assert!(tokens > 100, "the built-in text is {tokens} tokens");
        let layers = r["layers"].as_array().unwrap();
        assert_eq!(layers.len(), n_moe, "one row per MoE layer");
        let changed: u64 = layers.iter().map(|l| l["changed"].as_u64().unwrap()).sum();
        assert!(layers.iter().all(|l| l["tokens"].as_u64() == Some(tokens)));
        let ppl = (r["ppl_ref"].as_f64().unwrap(), r["ppl_quant"].as_f64().unwrap());
        println!(
            "{f}: ppl {:.3} -> {:.3}, top-1 {:.3}, experts changed {changed} of {}",
            ppl.0,
            ppl.1,
            r["top1_agree"],
            n_moe as u64 * tokens
        );
        assert!(ppl.0 > 1.0 && ppl.1 > 1.0 && ppl.0 != ppl.1);
        shares.push(changed);
    }
    assert!(
        shares[0] <= shares[2],
        "int8 changed more experts ({}) than q4 ({})",
        shares[0],
        shares[2]
    );
}
