//! A fake hub cache with the real layout (`models--Zyphra--BlackMamba-2.8B/{refs,blobs,snapshots}`)
//! built from tiny checkpoints: offline loads, missing files, corrupt files, the tokenizer check,
//! and the pickle -> safetensors conversion being reused and redone.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use blackmamba::hub::HubEnv;
use blackmamba::loader::{load, LoadOpts, ModelSource};
use blackmamba::model::config::Config;
use blackmamba::model::convert::{ensure_safetensors, Conversion};
use blackmamba::model::{pth_write, Logits};
use candle_core::{DType, Device, Tensor};
use common::{max_abs, tiny_config, tiny_model};

const REPO: &str = "Zyphra/BlackMamba-2.8B";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Writes `cfg` + a model with `seed` into the cache the way the hub client does: blobs named by
/// hash, snapshot entries as relative links.
fn populate(cache: &Path, cfg: &Config, seed: u64, files: &[&str]) -> PathBuf {
    let repo = cache.join("models--Zyphra--BlackMamba-2.8B");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let m = tiny_model(cfg, seed);
    let tmp = tempfile::tempdir().unwrap();
    pth_write::write(&tmp.path().join("w.bin"), &m.named_tensors().unwrap()).unwrap();
    for f in files {
        let bytes = if *f == "config.json" {
            cfg.to_json_string().unwrap().into_bytes()
        } else {
            std::fs::read(tmp.path().join("w.bin")).unwrap()
        };
        let blob = format!("{:064x}", seed * 1000 + bytes.len() as u64);
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        let link = snap.join(f);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), &link).unwrap();
    }
    snap
}

fn env(cache: &Path) -> HubEnv {
    HubEnv {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
    }
}

fn opts(cache: &Path) -> LoadOpts {
    LoadOpts {
        hub: Some(env(cache)),
        ..Default::default()
    }
}

fn hub_source() -> ModelSource {
    ModelSource::parse(Some(REPO), None).unwrap()
}

fn neox_sized() -> Config {
    tiny_config(&["r", "8"], 16, 50304)
}

fn err(cache: &Path) -> String {
    match load(&hub_source(), &Device::Cpu, DType::F32, &opts(cache)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn aliases_parse_to_the_zyphra_repos() {
    assert_eq!(
        ModelSource::parse(Some("2.8b"), None).unwrap(),
        ModelSource::Hub {
            repo: REPO.into(),
            revision: None
        }
    );
    assert_eq!(
        ModelSource::parse(Some("1.5b"), Some("abc")).unwrap(),
        ModelSource::Hub {
            repo: "Zyphra/BlackMamba-1.5B".into(),
            revision: Some("abc".into())
        }
    );
    assert!(ModelSource::parse(Some("no-such-dir"), None)
        .unwrap_err()
        .to_string()
        .contains("not a hub id"));
}

#[test]
fn offline_load_from_the_cache_converts_once_and_matches_the_weights() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = neox_sized();
    let snap = populate(cache.path(), &cfg, 5, &["config.json", "pytorch_model.bin"]);
    let loaded = load(&hub_source(), &Device::Cpu, DType::F32, &opts(cache.path())).unwrap();
    assert!(snap.join("model.safetensors").is_file(), "first load converts to safetensors");
    let ids = [1u32, 2, 3, 400, 50000];
    let want = tiny_model(&cfg, 5);
    let f = |m: &blackmamba::model::Model| {
        m.forward(
            &Tensor::from_slice(&ids, (1, 5), &Device::Cpu).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::All,
            None,
        )
        .unwrap()
    };
    assert!(max_abs(&f(&loaded.model), &f(&want)) < 1e-6);
    // the second load reuses the conversion
    assert_eq!(ensure_safetensors(&snap, &mut |_, _| {}).unwrap().1, Conversion::Reused);
}

#[test]
fn a_changed_source_is_converted_again() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = neox_sized();
    let snap = populate(cache.path(), &cfg, 1, &["config.json", "pytorch_model.bin"]);
    assert_eq!(ensure_safetensors(&snap, &mut |_, _| {}).unwrap().1, Conversion::Converted);
    assert_eq!(ensure_safetensors(&snap, &mut |_, _| {}).unwrap().1, Conversion::Reused);
    // a new revision of the weights lands in a new blob
    populate(cache.path(), &cfg, 2, &["pytorch_model.bin"]);
    let loaded = load(&hub_source(), &Device::Cpu, DType::F32, &opts(cache.path())).unwrap();
    let ids = [7u32, 8, 9];
    let f = |m: &blackmamba::model::Model| {
        m.forward(
            &Tensor::from_slice(&ids, (1, 3), &Device::Cpu).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::All,
            None,
        )
        .unwrap()
    };
    assert!(
        max_abs(&f(&loaded.model), &f(&tiny_model(&cfg, 2))) < 1e-6,
        "loads the new weights, not the stale conversion"
    );
}

#[test]
fn missing_files_are_listed_with_where_we_looked() {
    let cache = tempfile::tempdir().unwrap();
    let e = err(cache.path());
    assert!(
        e.contains("config.json, pytorch_model.bin") && e.contains("models--Zyphra--BlackMamba-2.8B") && e.contains("offline"),
        "{e}"
    );
    populate(cache.path(), &neox_sized(), 1, &["config.json"]);
    let e = err(cache.path());
    assert!(e.contains("missing pytorch_model.bin") && !e.contains("config.json,"), "{e}");
}

#[test]
fn corrupt_and_truncated_cached_weights_are_clear_errors() {
    let cache = tempfile::tempdir().unwrap();
    let snap = populate(cache.path(), &neox_sized(), 1, &["config.json", "pytorch_model.bin"]);
    let bin = std::fs::canonicalize(snap.join("pytorch_model.bin")).unwrap();
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() / 3]).unwrap();
    let e = err(cache.path());
    assert!(
        e.contains("pytorch_model.bin") && (e.contains("truncated") || e.contains("corrupt")),
        "{e}"
    );
    assert!(
        !snap.join("model.safetensors").exists(),
        "no half-written conversion is left behind"
    );
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    populate(
        cache.path(),
        &tiny_config(&["r", "8"], 16, 512),
        1,
        &["config.json", "pytorch_model.bin"],
    );
    let e = err(cache.path());
    assert!(e.contains("50277") && e.contains("512") && e.contains("--tokenizer"), "{e}");
}

#[test]
fn an_unreachable_hub_is_a_download_error_naming_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let env = HubEnv {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
    };
    let o = LoadOpts {
        hub: Some(env),
        ..Default::default()
    };
    let e = match load(&hub_source(), &Device::Cpu, DType::F32, &o) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("downloading config.json of Zyphra/BlackMamba-2.8B@main failed") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}
