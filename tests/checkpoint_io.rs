//! Checkpoints written by the tests round-trip through both file formats, and every bad input
//! gives its own clear error.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use blackmamba::loader::load_dir;
use blackmamba::model::config::Config;
use blackmamba::model::pth_write;
use blackmamba::model::random::{random_tensors, RandomInit};
use blackmamba::model::Logits;
use candle_core::{DType, Device, Tensor};
use common::{max_abs, random_ids, tiny_config, tiny_model};

fn logits_of(dir: &Path, ids: &[u32]) -> Tensor {
    let (m, _) = load_dir(dir, &Device::Cpu, DType::F32).unwrap();
    m.forward(
        &Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap(),
        &mut m.new_state(1).unwrap(),
        Logits::All,
        None,
    )
    .unwrap()
}

fn write_pth(dir: &Path, cfg: &Config, dtype: DType) {
    let t = random_tensors(cfg, RandomInit { seed: 3, perturb: true }, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Tensor)> = t.into_iter().map(|(n, t)| (n, t.to_dtype(dtype).unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    pth_write::write(&dir.join("pytorch_model.bin"), &v).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_string().unwrap()).unwrap();
}

#[test]
fn safetensors_and_pth_round_trip() {
    let cfg = tiny_config(&["r", "8", "r", "1"], 32, 80);
    let m = tiny_model(&cfg, 11);
    let ids = random_ids(20, 80, 1);
    let want = m
        .forward(
            &Tensor::from_slice(&ids, (1, 20), &Device::Cpu).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::All,
            None,
        )
        .unwrap();
    // safetensors via save_dir
    let a = tempfile::tempdir().unwrap();
    m.save_dir(a.path(), DType::F32).unwrap();
    assert!(max_abs(&logits_of(a.path(), &ids), &want) < 1e-6);
    // torch zip pickle of the same tensors
    let b = tempfile::tempdir().unwrap();
    let v = m.named_tensors().unwrap();
    pth_write::write(&b.path().join("pytorch_model.bin"), &v).unwrap();
    std::fs::write(b.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    assert!(max_abs(&logits_of(b.path(), &ids), &want) < 1e-6);
    // sharded safetensors with an index
    let c = tempfile::tempdir().unwrap();
    let (first, second) = v.split_at(v.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let h: std::collections::HashMap<String, Tensor> = part.iter().cloned().collect();
        candle_core::safetensors::save(&h, c.path().join(&file)).unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    std::fs::write(
        c.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::write(c.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    assert!(max_abs(&logits_of(c.path(), &ids), &want) < 1e-6);
}

#[test]
fn bf16_pth_loads_and_keeps_small_tensors_in_f32() {
    let cfg = tiny_config(&["r", "8"], 32, 40);
    let d = tempfile::tempdir().unwrap();
    write_pth(d.path(), &cfg, DType::BF16);
    let (m, _) = load_dir(d.path(), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(m.embedding.dtype(), DType::BF16);
    assert_eq!(m.layers[0].norm.dtype(), DType::F32);
    let ids = random_ids(5, 40, 2);
    let l = m
        .forward(
            &Tensor::from_slice(&ids, (1, 5), &Device::Cpu).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::All,
            None,
        )
        .unwrap();
    assert_eq!(l.dtype(), DType::F32);
    assert!(l.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

fn err_of(dir: &Path) -> String {
    match load_dir(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() {
    let cfg = tiny_config(&["r", "8"], 32, 40);
    let all = random_tensors(&cfg, RandomInit { seed: 1, perturb: false }, &Device::Cpu).unwrap();
    let save = |m: &std::collections::HashMap<String, Tensor>| {
        let d = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(m, d.path().join("model.safetensors")).unwrap();
        std::fs::write(d.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
        d
    };
    let mut m = all.clone();
    m.remove("decoder.layers.0.mixer.A_log");
    let e = err_of(save(&m).path());
    assert!(
        e.contains("missing tensor 'decoder.layers.0.mixer.A_log'") && e.contains("[64, 8]"),
        "{e}"
    );

    let mut m = all.clone();
    m.insert(
        "decoder.layers.0.mixer.in_proj.bias".into(),
        Tensor::zeros(128, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err_of(save(&m).path());
    assert!(e.contains("unexpected tensor 'decoder.layers.0.mixer.in_proj.bias'"), "{e}");

    let mut m = all;
    m.insert(
        "decoder.layers.1.mixer.router.weight".into(),
        Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err_of(save(&m).path());
    assert!(
        e.contains("'decoder.layers.1.mixer.router.weight'") && e.contains("[7, 32]") && e.contains("[8, 32]"),
        "{e}"
    );
}

#[test]
fn corrupt_and_truncated_files_are_clear_errors() {
    let cfg = tiny_config(&["r", "8"], 32, 40);
    let d = tempfile::tempdir().unwrap();
    write_pth(d.path(), &cfg, DType::F32);
    let bin = d.path().join("pytorch_model.bin");
    let bytes = std::fs::read(&bin).unwrap();
    for cut in [10, bytes.len() / 2, bytes.len() - 30] {
        std::fs::write(&bin, &bytes[..cut]).unwrap();
        let e = err_of(d.path());
        assert!(e.contains("pytorch_model.bin"), "cut at {cut}: {e}");
    }
    std::fs::write(&bin, b"this is not a zip file at all").unwrap();
    assert!(err_of(d.path()).contains("not a torch zip checkpoint"));

    let s = tempfile::tempdir().unwrap();
    std::fs::write(s.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    std::fs::write(s.path().join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
    let e = err_of(s.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");

    let empty = tempfile::tempdir().unwrap();
    assert!(err_of(empty.path()).contains("no config.json"));
    std::fs::write(empty.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    assert!(err_of(empty.path()).contains("no weights found"));
}

#[test]
fn a_pickle_naming_a_foreign_global_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("pytorch_model.bin");
    // {"model": os.system("echo pwned")} as a protocol-2 pickle
    let mut pkl = vec![0x80, 2, b'}', b'X', 5, 0, 0, 0];
    pkl.extend_from_slice(b"model");
    pkl.extend_from_slice(b"cos\nsystem\n");
    pkl.extend_from_slice(&[b'X', 10, 0, 0, 0]);
    pkl.extend_from_slice(b"echo pwned");
    pkl.extend_from_slice(&[0x85, b'R', b's', b'.']);
    let f = std::fs::File::create(&bin).unwrap();
    let mut z = zip::ZipWriter::new(f);
    z.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default()).unwrap();
    std::io::Write::write_all(&mut z, &pkl).unwrap();
    z.finish().unwrap();
    let cfg = tiny_config(&["r", "8"], 32, 40);
    std::fs::write(d.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    let e = err_of(d.path());
    assert!(e.contains("refusing pickle global 'os.system'"), "{e}");
}

#[test]
fn bad_configs_name_the_key_and_the_value() {
    let base = serde_json::json!({
        "num_layers": 2, "hidden_size": 32, "state_size": 8, "conv_dimension": 4, "vocab_size": 40,
        "expansion_factor": 2, "mamba_moe_layers": ["r", "8"], "ffn_hidden_size": 24,
        "add_bias_linear": false, "swiglu": true, "max_sequence_length": 2048
    });
    let with = |k: &str, v: serde_json::Value| {
        let mut j = base.clone();
        if v.is_null() {
            j.as_object_mut().unwrap().remove(k);
        } else {
            j[k] = v;
        }
        Config::from_json_str(&j.to_string()).unwrap_err().to_string()
    };
    assert!(with("hidden_size", serde_json::Value::Null).contains("'hidden_size' is missing"));
    let e = with("mamba_moe_layers", serde_json::json!(["r", "x"]));
    assert!(e.contains("mamba_moe_layers") && e.contains("\"x\""), "{e}");
    let e = with("mamba_moe_layers", serde_json::json!(["r", "r2"]));
    assert!(e.contains("\"r2\""), "{e}");
    let e = with("num_layers", serde_json::json!(3));
    assert!(e.contains("has 2 entries but num_layers is 3"), "{e}");
    let e = with("hidden_size", serde_json::json!("big"));
    assert!(e.contains("'hidden_size'") && e.contains("\"big\""), "{e}");
    let e = with("swiglu", serde_json::json!(3));
    assert!(e.contains("'swiglu'"), "{e}");
    assert!(Config::from_json_str("{not json")
        .unwrap_err()
        .to_string()
        .contains("not valid JSON"));
    // the fixture's config parses, and derived sizes follow SPEC §1
    let c = Config::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a/config.json"))).unwrap();
    assert_eq!((c.d_inner(), c.dt_rank(), c.x_proj_rows(), c.fc1_rows()), (128, 4, 36, 192));
}

#[test]
fn released_shapes_have_the_published_parameter_counts() {
    assert_eq!(Config::blackmamba_1_5b().param_counts().0, 1_458_462_072);
    assert_eq!(Config::blackmamba_2_8b().param_counts().0, 2_783_213_584);
}
