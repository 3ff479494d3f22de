#![allow(clippy::unwrap_used)]
//! The model catalogue behind the TUI's model picker and `blackmamba models`, on a fake hub cache
//! with the real layout: cached / partly cached / missing repos, online and offline, converted or
//! not, foreign repos left out; every listed choice names itself the way the loader labels it.

mod common;

use std::path::{Path, PathBuf};

use blackmamba::catalog::{cached_repos, scan, split_revision, Availability, Catalog, ModelChoice};
use blackmamba::hub::HubEnv;
use blackmamba::loader::{load, LoadOpts, ModelSource};
use blackmamba::model::config::Config;
use blackmamba::model::convert::{ConversionCache, MARKER};
use blackmamba::model::pth_write;
use candle_core::{DType, Device};
use common::{tiny_config, tiny_model};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Puts `files` of repo `repo` into the cache as the hub client does (blobs + relative links);
/// `config.json` holds `config` (any JSON), `pytorch_model.bin` a tiny BlackMamba checkpoint.
fn populate(cache: &Path, repo: &str, config: &str, files: &[&str]) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), COMMIT).unwrap();
    for (i, f) in files.iter().enumerate() {
        let blob = dir.join("blobs").join(format!("{i:064x}"));
        if *f == "config.json" {
            std::fs::write(&blob, config).unwrap();
        } else {
            let cfg = Config::from_json_str(config).unwrap();
            pth_write::write(&blob, &tiny_model(&cfg, 5).named_tensors().unwrap()).unwrap();
        }
        std::os::unix::fs::symlink(format!("../../blobs/{i:064x}"), snap.join(f)).unwrap();
    }
    snap
}

fn env(cache: &Path, offline: bool) -> HubEnv {
    HubEnv {
        cache_dir: cache.to_path_buf(),
        offline,
        endpoint: None,
        token: None,
        convert_cache: Some(cache.join("blackmamba-conversions")),
    }
}

fn neox_tiny() -> String {
    tiny_config(&["r", "8"], 16, 50304).to_json_string().unwrap()
}

fn find<'a>(c: &'a Catalog, name: &str) -> &'a ModelChoice {
    c.choices
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} not listed: {:?}", c.choices.iter().map(|m| &m.name).collect::<Vec<_>>()))
}

#[test]
fn empty_cache_lists_embedded_zyphra_and_random_shapes() {
    let cache = tempfile::tempdir().unwrap();
    let online = scan(Some(&env(cache.path(), false)));
    let names: Vec<&str> = online.choices.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "embedded",
            "Zyphra/BlackMamba-1.5B",
            "Zyphra/BlackMamba-2.8B",
            "random:tiny",
            "random:1.5b",
            "random:2.8b"
        ]
    );
    let embedded = &online.choices[0];
    assert_eq!(embedded.arg, None);
    assert_eq!(embedded.availability, Availability::Ready);
    let cfg = Config::from_json_str(blackmamba::embedded::CONFIG_JSON).unwrap();
    assert_eq!(embedded.params, Some(cfg.param_counts()));
    assert!(!embedded.untrained);
    let z = find(&online, "Zyphra/BlackMamba-2.8B");
    assert_eq!(
        z.availability,
        Availability::Download {
            missing: vec!["config.json".into(), "pytorch_model.bin".into()]
        }
    );
    assert_eq!(z.params, Some(Config::blackmamba_2_8b().param_counts()));
    assert!(find(&online, "random:2.8b").untrained);
    assert!(!online.offline);
    assert_eq!(online.cache_dir, cache.path());

    // offline: the Zyphra repos cannot load, and the reason names the missing files and the folder
    let offline = scan(Some(&env(cache.path(), true)));
    let z = find(&offline, "Zyphra/BlackMamba-1.5B");
    match &z.availability {
        Availability::Unavailable { reason } => {
            assert!(reason.contains("config.json, pytorch_model.bin"), "{reason}");
            assert!(reason.contains("models--Zyphra--BlackMamba-1.5B"), "{reason}");
            assert!(reason.contains("HF_HUB_OFFLINE"), "{reason}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(!z.availability.loadable());
    assert!(offline.choices[0].availability.loadable());
}

#[test]
fn cached_converted_partial_and_foreign_repos() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = neox_tiny();
    let snap = populate(cache.path(), "Zyphra/BlackMamba-2.8B", &cfg, &["config.json", "pytorch_model.bin"]);
    populate(cache.path(), "Zyphra/BlackMamba-1.5B", &cfg, &["config.json"]);
    populate(cache.path(), "someone/mamba-moe-small", &cfg, &["config.json", "pytorch_model.bin"]);
    populate(
        cache.path(),
        "someone/llama",
        r#"{"model_type": "llama", "hidden_size": 64}"#,
        &["config.json"],
    );
    std::fs::create_dir_all(cache.path().join("datasets--someone--text")).unwrap();
    std::fs::create_dir_all(cache.path().join(".locks")).unwrap();

    assert_eq!(
        cached_repos(cache.path()),
        [
            "Zyphra/BlackMamba-1.5B",
            "Zyphra/BlackMamba-2.8B",
            "someone/llama",
            "someone/mamba-moe-small"
        ]
    );
    let c = scan(Some(&env(cache.path(), true)));
    // cached but not converted yet
    let z = find(&c, "Zyphra/BlackMamba-2.8B");
    assert_eq!(z.availability, Availability::Convert);
    let bin = std::fs::metadata(snap.join("pytorch_model.bin")).unwrap().len();
    assert_eq!(z.disk_bytes, Some(bin));
    // the cached config.json is what loads (here a tiny one), not the released shape
    assert_eq!(z.params, Some(Config::from_json_str(&cfg).unwrap().param_counts()));
    assert_ne!(z.params, Some(Config::blackmamba_2_8b().param_counts()));
    // only the config is cached: offline it cannot load, online it downloads the weights
    assert!(matches!(
        find(&c, "Zyphra/BlackMamba-1.5B").availability,
        Availability::Unavailable { .. }
    ));
    let online = scan(Some(&env(cache.path(), false)));
    assert_eq!(
        find(&online, "Zyphra/BlackMamba-1.5B").availability,
        Availability::Download {
            missing: vec!["pytorch_model.bin".into()]
        }
    );
    // another BlackMamba repo in the cache is listed with its own config's size
    let other = find(&c, "someone/mamba-moe-small");
    assert_eq!(other.arg.as_deref(), Some("someone/mamba-moe-small"));
    assert_eq!(other.params, Some(Config::from_json_str(&cfg).unwrap().param_counts()));
    // a repo whose config.json is not a BlackMamba config is not
    assert!(c.choices.iter().all(|m| m.name != "someone/llama"));
    // the Zyphra repos are listed once
    assert_eq!(c.choices.iter().filter(|m| m.name.starts_with("Zyphra/")).count(), 2);

    // a conversion an earlier version left in the snapshot, of another source, does not count
    std::fs::write(snap.join("model.safetensors"), b"stale").unwrap();
    std::fs::write(snap.join(MARKER), r#"{"source": "pytorch_model.bin", "fingerprint": "blob:old"}"#).unwrap();
    assert_eq!(
        find(&scan(Some(&env(cache.path(), true))), "Zyphra/BlackMamba-2.8B").availability,
        Availability::Convert
    );

    // after the first load's conversion (into our own cache) the repo is ready, and its size on
    // disk counts both files
    let conv = ConversionCache::new(cache.path().join("blackmamba-conversions"));
    let (st, _) = conv.ensure(&snap.join("pytorch_model.bin"), &mut |_, _| {}).unwrap();
    let c = scan(Some(&env(cache.path(), true)));
    let z = find(&c, "Zyphra/BlackMamba-2.8B");
    assert_eq!(z.availability, Availability::Ready);
    assert_eq!(z.disk_bytes, Some(bin + std::fs::metadata(&st).unwrap().len()));
}

#[test]
fn a_cached_choice_loads_under_its_label() {
    let cache = tempfile::tempdir().unwrap();
    populate(
        cache.path(),
        "someone/mamba-moe-small",
        &neox_tiny(),
        &["config.json", "pytorch_model.bin"],
    );
    let e = env(cache.path(), true);
    let c = scan(Some(&e));
    let opts = LoadOpts {
        hub: Some(e.clone()),
        ..Default::default()
    };
    for name in ["someone/mamba-moe-small", "random:tiny"] {
        let choice = find(&c, name);
        let source = ModelSource::parse(choice.arg.as_deref(), None).unwrap();
        let loaded = load(&source, &Device::Cpu, DType::F32, &opts).unwrap();
        // the picker marks the loaded model by this label
        assert_eq!(loaded.label, choice.label, "{name}");
        assert_eq!(loaded.untrained, choice.untrained, "{name}");
        let (total, _) = choice.params.unwrap();
        assert_eq!(loaded.model.cfg.param_counts().0, total, "{name}");
    }
    // every choice's label is the loader's label for its --model value
    for m in &c.choices {
        assert_eq!(ModelSource::parse(m.arg.as_deref(), None).unwrap().label(), m.label);
    }
}

#[test]
fn typed_entries_split_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let with_at = dir.path().join("model@v2");
    std::fs::create_dir_all(&with_at).unwrap();
    let with_at = with_at.to_str().unwrap().to_string();
    let cases: Vec<(&str, (&str, Option<&str>))> = vec![
        ("Zyphra/BlackMamba-2.8B@main", ("Zyphra/BlackMamba-2.8B", Some("main"))),
        (" 2.8b@0123abc ", ("2.8b", Some("0123abc"))),
        ("Zyphra/BlackMamba-1.5B", ("Zyphra/BlackMamba-1.5B", None)),
        ("random:tiny@7", ("random:tiny@7", None)),
        ("owner/name@", ("owner/name@", None)),
        ("@rev", ("@rev", None)),
        (&with_at, (&with_at, None)),
    ];
    for (text, (model, rev)) in cases {
        assert_eq!(split_revision(text), (model.to_string(), rev.map(str::to_string)), "{text}");
    }
}
