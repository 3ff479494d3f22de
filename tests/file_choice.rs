//! Which file of a model folder is taken for the weights: `model.safetensors`, the index's shards,
//! then `pytorch_model.bin`, never "any one .safetensors"; and every error about the weights names
//! the file they came from.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use blackmamba::loader::load_dir;
use blackmamba::model::pth_write;
use candle_core::{DType, Device, Tensor};
use common::{tiny_config, tiny_model};

fn load_err(dir: &Path) -> String {
    match load_dir(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_unrelated_safetensors_beside_the_bin_is_not_taken_for_the_weights() {
    let cfg = tiny_config(&["r", "8"], 16, 40);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    let m = tiny_model(&cfg, 4);
    pth_write::write(&d.path().join("pytorch_model.bin"), &m.named_tensors().unwrap()).unwrap();
    let other: std::collections::HashMap<String, Tensor> =
        [("logits".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())].into();
    candle_core::safetensors::save(&other, d.path().join("reference.safetensors")).unwrap();
    let (loaded, _) = load_dir(d.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.cfg.num_layers, 2);

    // with no weights by a known name, the stray file is named, with the fix
    std::fs::remove_file(d.path().join("pytorch_model.bin")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("reference.safetensors") && e.contains("rename it to model.safetensors"),
        "{e}"
    );
}

#[test]
fn errors_about_the_weights_name_the_file_they_came_from() {
    let cfg = tiny_config(&["r", "8"], 16, 40);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    let mut t: std::collections::HashMap<String, Tensor> = tiny_model(&cfg, 4).named_tensors().unwrap().into_iter().collect();
    t.remove("decoder.final_layernorm.bias");
    candle_core::safetensors::save(&t, d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("decoder.final_layernorm.bias"), "{e}");
    // the same from a pickle
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let v: Vec<(String, Tensor)> = t.into_iter().collect();
    pth_write::write(&d.path().join("pytorch_model.bin"), &v).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("decoder.final_layernorm.bias"), "{e}");
}

#[test]
fn a_stale_conversion_an_earlier_version_left_beside_the_bin_is_skipped() {
    use blackmamba::model::Logits;
    let cfg = tiny_config(&["r", "8"], 16, 40);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), cfg.to_json_string().unwrap()).unwrap();
    pth_write::write(&d.path().join("pytorch_model.bin"), &tiny_model(&cfg, 1).named_tensors().unwrap()).unwrap();
    let old: std::collections::HashMap<String, Tensor> = tiny_model(&cfg, 2).named_tensors().unwrap().into_iter().collect();
    candle_core::safetensors::save(&old, d.path().join("model.safetensors")).unwrap();
    let marker = d.path().join(blackmamba::model::convert::MARKER);
    let logits = |seed: Option<u64>| {
        let m = match seed {
            Some(s) => tiny_model(&cfg, s),
            None => load_dir(d.path(), &Device::Cpu, DType::F32).unwrap().0,
        };
        let ids = Tensor::from_slice(&[1u32, 2, 3], (1, 3), &Device::Cpu).unwrap();
        m.forward(&ids, &mut m.new_state(1).unwrap(), Logits::All, None).unwrap()
    };
    // the marker names another source: the .bin is what loads
    std::fs::write(&marker, r#"{"source": "pytorch_model.bin", "fingerprint": "size:1:mtime:2"}"#).unwrap();
    assert!(common::max_abs(&logits(None), &logits(Some(1))) < 1e-6);
    // without a marker, model.safetensors is the user's own and comes first
    std::fs::remove_file(&marker).unwrap();
    assert!(common::max_abs(&logits(None), &logits(Some(2))) < 1e-6);
}
