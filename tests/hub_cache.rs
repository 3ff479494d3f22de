//! A fake hub cache with the real layout (`models--Zyphra--BlackMamba-2.8B/{refs,blobs,snapshots}`)
//! built from tiny checkpoints: offline loads, revisions resolved as Python's `huggingface_hub`
//! does, missing files, corrupt files, the tokenizer check, and the pickle -> safetensors
//! conversion: kept in our own cache (never in the hub's), reused, redone, and skipped with a note
//! when that cache cannot be written.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use blackmamba::hub::HubEnv;
use blackmamba::loader::{load, LoadOpts, ModelSource};
use blackmamba::model::config::Config;
use blackmamba::model::convert::{Conversion, ConversionCache};
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
        convert_cache: Some(conv_dir(cache)),
    }
}

/// Our conversion cache in these tests (inside the temp hub cache, so it is cleaned up with it).
fn conv_dir(cache: &Path) -> PathBuf {
    cache.join("blackmamba-conversions")
}

fn conversions(cache: &Path) -> ConversionCache {
    ConversionCache::new(conv_dir(cache))
}

/// Every path under `dir`, with its size (links as their target's), sorted.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                todo.push(p.clone());
            }
            out.push((p.clone(), std::fs::metadata(&p).map_or(0, |m| m.len())));
        }
    }
    out.sort();
    out
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
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    let bin = snap.join("pytorch_model.bin");
    let converted = conversions(cache.path()).lookup(&bin).expect("first load converts to safetensors");
    assert!(converted.starts_with(conv_dir(cache.path())), "{}", converted.display());
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
    assert_eq!(
        conversions(cache.path()).ensure(&bin, &mut |_, _| {}).unwrap().1,
        Conversion::Reused
    );
}

#[test]
fn a_changed_source_is_converted_again() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = neox_sized();
    let snap = populate(cache.path(), &cfg, 1, &["config.json", "pytorch_model.bin"]);
    let bin = snap.join("pytorch_model.bin");
    assert_eq!(
        conversions(cache.path()).ensure(&bin, &mut |_, _| {}).unwrap().1,
        Conversion::Converted
    );
    assert_eq!(
        conversions(cache.path()).ensure(&bin, &mut |_, _| {}).unwrap().1,
        Conversion::Reused
    );
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
        listing(&conv_dir(cache.path())).iter().all(|(p, _)| p.is_dir()),
        "no half-written conversion is left behind: {:?}",
        listing(&conv_dir(cache.path()))
    );
    assert!(!snap.join("model.safetensors").exists());
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
        convert_cache: None,
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

#[test]
fn loading_never_writes_into_the_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snap = populate(cache.path(), &neox_sized(), 3, &["config.json", "pytorch_model.bin"]);
    let repo = snap.parent().unwrap().parent().unwrap().to_path_buf();
    let before = listing(&repo);
    // read-only, as on shared clusters and in containers (root ignores it; the listing does not)
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&snap).unwrap().permissions().mode();
    std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o555)).unwrap();
    let loaded = load(&hub_source(), &Device::Cpu, DType::F32, &opts(cache.path()));
    std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(mode)).unwrap();
    let loaded = loaded.unwrap();
    assert_eq!(listing(&repo), before, "the hub cache is unchanged");
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    assert!(conversions(cache.path()).lookup(&snap.join("pytorch_model.bin")).is_some());
}

#[test]
fn an_unwritable_conversion_cache_reads_the_bin_directly_and_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = neox_sized();
    populate(cache.path(), &cfg, 6, &["config.json", "pytorch_model.bin"]);
    // a file where the cache folder should be: no one, root included, can create it
    let blocked = cache.path().join("not-a-folder");
    std::fs::write(&blocked, b"").unwrap();
    let mut e = env(cache.path());
    e.convert_cache = Some(blocked.join("blackmamba"));
    let o = LoadOpts {
        hub: Some(e),
        ..Default::default()
    };
    let loaded = load(&hub_source(), &Device::Cpu, DType::F32, &o).unwrap();
    let ids = [5u32, 6, 7];
    let f = |m: &blackmamba::model::Model| {
        m.forward(
            &Tensor::from_slice(&ids, (1, 3), &Device::Cpu).unwrap(),
            &mut m.new_state(1).unwrap(),
            Logits::All,
            None,
        )
        .unwrap()
    };
    assert!(max_abs(&f(&loaded.model), &f(&tiny_model(&cfg, 6))) < 1e-6);
    assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
    let note = &loaded.notes[0];
    assert!(
        note.contains("reading pytorch_model.bin directly") && note.contains("not-a-folder") && note.contains("XDG_CACHE_HOME"),
        "{note}"
    );
}

#[test]
fn a_copied_source_is_hashed_once_and_found_again() {
    // snapshots without links (a hub cache on a file system without symlinks) hold real files
    let dir = tempfile::tempdir().unwrap();
    let cfg = neox_sized();
    let bin = dir.path().join("pytorch_model.bin");
    pth_write::write(&bin, &tiny_model(&cfg, 8).named_tensors().unwrap()).unwrap();
    let c = conversions(dir.path());
    assert_eq!(c.lookup(&bin), None);
    let (st, how) = c.ensure(&bin, &mut |_, _| {}).unwrap();
    assert_eq!(how, Conversion::Converted);
    // keyed by the sha256 of the content
    let sha = c.source_hash(&bin).unwrap();
    assert_eq!(st.parent().unwrap().file_name().unwrap().to_str().unwrap(), sha);
    assert_eq!(c.lookup(&bin), Some(st.clone()), "found again without hashing");
    // a copy of the same content shares the conversion
    let copy = dir.path().join("copy.bin");
    std::fs::copy(&bin, &copy).unwrap();
    assert_eq!(c.ensure(&copy, &mut |_, _| {}).unwrap(), (st, Conversion::Reused));
}

/// A cache as Python's huggingface_hub leaves it: `refs/main` and `refs/v1` name the commit.
fn python_cache(cache: &Path) -> PathBuf {
    let snap = populate(cache, &neox_sized(), 4, &["config.json", "pytorch_model.bin"]);
    let refs = cache.join("models--Zyphra--BlackMamba-2.8B/refs");
    std::fs::write(refs.join("v1"), COMMIT).unwrap();
    std::fs::create_dir_all(refs.join("refs/pr")).unwrap();
    std::fs::write(refs.join("refs/pr/1"), COMMIT).unwrap();
    snap
}

#[test]
fn revisions_resolve_offline_as_python_huggingface_hub_does() {
    let cache = tempfile::tempdir().unwrap();
    python_cache(cache.path());
    for rev in [COMMIT, "main", "v1", "refs/pr/1"] {
        let source = ModelSource::parse(Some(REPO), Some(rev)).unwrap();
        if let Err(e) = load(&source, &Device::Cpu, DType::F32, &opts(cache.path())) {
            panic!("--revision {rev}: {e}");
        }
    }
}

#[test]
fn an_uncached_revision_offline_names_it_and_the_cached_snapshots() {
    let cache = tempfile::tempdir().unwrap();
    python_cache(cache.path());
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    for rev in [other, "v2"] {
        let source = ModelSource::parse(Some(REPO), Some(rev)).unwrap();
        let e = match load(&source, &Device::Cpu, DType::F32, &opts(cache.path())) {
            Ok(_) => panic!("{rev} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&format!("@{rev}")) && e.contains(COMMIT) && e.contains("--revision"),
            "{e}"
        );
    }
    // a revision cannot leave the cache folder
    let source = ModelSource::parse(Some(REPO), Some("../../x")).unwrap();
    let e = load(&source, &Device::Cpu, DType::F32, &opts(cache.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--revision ../../x"), "{e}");
}

#[test]
fn the_conversion_cache_follows_xdg_then_home() {
    use blackmamba::hub::default_convert_cache;
    let some = |s: &str| Some(std::ffi::OsString::from(s));
    assert_eq!(
        default_convert_cache(some("/x/cache"), some("/home/u")),
        Some(PathBuf::from("/x/cache/blackmamba"))
    );
    // a relative XDG_CACHE_HOME is ignored, as the XDG spec asks
    assert_eq!(
        default_convert_cache(some("rel"), some("/home/u")),
        Some(PathBuf::from("/home/u/.cache/blackmamba"))
    );
    assert_eq!(default_convert_cache(None, None), None);
}

#[test]
fn without_hub_settings_a_hub_id_is_refused_in_one_line() {
    // the layers below the command line read no environment: a caller that gives no hub
    // settings cannot reach the hub (or the process's hub cache) by accident
    let e = match load(&hub_source(), &Device::Cpu, DType::F32, &LoadOpts::default()) {
        Ok(_) => panic!("a hub id loaded without hub settings"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("Zyphra/BlackMamba-2.8B") && e.contains("local folder") && !e.contains('\n'),
        "{e}"
    );
}
