//! The models one can load, and whether each loads now: the embedded model, the two Zyphra
//! checkpoints (cached or not), any other BlackMamba repo found in the hub cache, and random
//! weights of the known shapes. The TUI's model picker (Ctrl-K) and `blackmamba models` show this
//! list; neither touches the network to make it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::hub::{cached_snapshot, HubEnv, REQUIRED_FILES};
use crate::loader::{random_config, ModelSource};
use crate::model::config::Config;
use crate::model::convert::ConversionCache;

/// The Zyphra checkpoints, always listed: (hub id, alias).
pub const ZYPHRA: [(&str, &str); 2] = [("Zyphra/BlackMamba-1.5B", "1.5b"), ("Zyphra/BlackMamba-2.8B", "2.8b")];

/// The random-weight shapes, always listed.
pub const RANDOM_SHAPES: [&str; 3] = ["tiny", "1.5b", "2.8b"];

/// Whether a choice loads now, and what loading it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Availability {
    /// Loads without the network (built in, random, or cached and already converted).
    Ready,
    /// Cached, but the first load converts `pytorch_model.bin` to safetensors (once, into this
    /// program's own cache).
    Convert,
    /// Loading downloads these files first.
    Download { missing: Vec<String> },
    /// Cannot load now (offline and not cached); the reason says what to do.
    Unavailable { reason: String },
}

impl Availability {
    /// Whether choosing it can succeed now.
    pub fn loadable(&self) -> bool {
        !matches!(self, Self::Unavailable { .. })
    }

    /// One short phrase for lists.
    pub fn short(&self) -> String {
        match self {
            Self::Ready => "ready".into(),
            Self::Convert => "cached, converts once".into(),
            Self::Download { missing } => format!("downloads {}", missing.join(" + ")),
            Self::Unavailable { .. } => "offline, not cached".into(),
        }
    }
}

/// One loadable model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelChoice {
    /// The `--model` value that loads it (`None`: the embedded model).
    pub arg: Option<String>,
    /// What the list shows.
    pub name: String,
    /// The label the loader gives it ([`ModelSource::label`]), to mark the loaded one.
    pub label: String,
    /// One line about it.
    pub about: String,
    /// Parameters in total and active per token, when the config is known without downloading.
    pub params: Option<(usize, usize)>,
    /// Bytes of weights on disk (cached hub repos): `pytorch_model.bin` plus its conversion in
    /// this program's cache, when there is one.
    pub disk_bytes: Option<u64>,
    /// Random weights (the UI shows the demo banner once loaded).
    pub untrained: bool,
    pub availability: Availability,
}

/// Everything the picker needs from the engine side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Catalog {
    pub choices: Vec<ModelChoice>,
    /// The hub cache that was looked at.
    pub cache_dir: PathBuf,
    pub offline: bool,
    /// Whether this build can run on a GPU.
    pub cuda: bool,
}

/// Lists the models of the embedded binary, the hub cache of `env` and the random shapes
/// (without hub settings: the embedded model and the random shapes, no cache folder).
pub fn scan(env: Option<&HubEnv>) -> Catalog {
    let mut choices = vec![embedded()];
    if let Some(env) = env {
        choices.extend(hub_choices(env));
    }
    for shape in RANDOM_SHAPES {
        let arg = format!("random:{shape}");
        choices.push(ModelChoice {
            label: label_of(Some(&arg)),
            name: arg.clone(),
            arg: Some(arg),
            about: format!("random weights of the {shape} shape: noise, for speed and memory tests"),
            params: Some(random_config(shape).param_counts()),
            disk_bytes: None,
            untrained: true,
            availability: Availability::Ready,
        });
    }
    Catalog {
        choices,
        cache_dir: env.map(|e| e.cache_dir.clone()).unwrap_or_default(),
        offline: env.is_none_or(|e| e.offline),
        cuda: candle_core::utils::cuda_is_available(),
    }
}

/// Zyphra's released checkpoints (cached or not) and the BlackMamba repos of the hub cache.
fn hub_choices(env: &HubEnv) -> Vec<ModelChoice> {
    let mut choices = Vec::new();
    for (repo, alias) in ZYPHRA {
        let cfg = if repo.ends_with("1.5B") {
            Config::blackmamba_1_5b()
        } else {
            Config::blackmamba_2_8b()
        };
        let about = format!("Zyphra's released checkpoint (--model {alias})");
        // the cached config.json is what will load; else the released shape
        let cfg = cached_config(env, repo).unwrap_or(cfg);
        choices.push(hub_choice(env, repo, Some(&cfg), about));
    }
    for repo in cached_repos(&env.cache_dir) {
        if ZYPHRA.iter().any(|(z, _)| z.eq_ignore_ascii_case(&repo)) {
            continue;
        }
        // only repos whose cached config.json is a BlackMamba config
        let Some(cfg) = cached_config(env, &repo) else {
            continue;
        };
        choices.push(hub_choice(env, &repo, Some(&cfg), "in the hub cache".into()));
    }
    choices
}

fn embedded() -> ModelChoice {
    let cfg = Config::from_json_str(crate::embedded::CONFIG_JSON).ok();
    ModelChoice {
        arg: None,
        name: "embedded".into(),
        label: label_of(None),
        about: "the small BlackMamba trained by this project, built into the binary".into(),
        params: cfg.map(|c| c.param_counts()),
        disk_bytes: None,
        untrained: false,
        availability: Availability::Ready,
    }
}

fn label_of(arg: Option<&str>) -> String {
    ModelSource::parse(arg, None).map_or_else(|_| arg.unwrap_or_default().to_string(), |s| s.label())
}

/// A hub repo as a choice: cached (converted or not), downloadable, or out of reach offline.
fn hub_choice(env: &HubEnv, repo: &str, cfg: Option<&Config>, about: String) -> ModelChoice {
    let snap = snapshot_dir(env, repo);
    let missing: Vec<String> = REQUIRED_FILES
        .iter()
        .filter(|f| snap.as_ref().is_none_or(|d| !d.join(f).is_file()))
        .map(|f| (*f).to_string())
        .collect();
    let bin = snap.as_ref().map(|d| d.join("pytorch_model.bin"));
    let conversion = bin.as_ref().and_then(|b| converted(env, b));
    let disk_bytes = bin
        .as_ref()
        .and_then(|b| std::fs::metadata(b).ok())
        .map(|m| m.len() + conversion.as_ref().and_then(|c| std::fs::metadata(c).ok()).map_or(0, |c| c.len()));
    let availability = if !missing.is_empty() {
        if env.offline {
            Availability::Unavailable {
                reason: format!(
                    "HF_HUB_OFFLINE is set and {} {} not in {}; download {} once online, or unset HF_HUB_OFFLINE",
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" },
                    env.repo_dir(repo).display(),
                    if missing.len() == 1 { "it" } else { "them" },
                ),
            }
        } else {
            Availability::Download { missing }
        }
    } else if conversion.is_some() || env.convert_cache.is_none() {
        // converted already, or no cache to convert into: the .bin is read as it is
        Availability::Ready
    } else {
        Availability::Convert
    };
    ModelChoice {
        arg: Some(repo.to_string()),
        name: repo.to_string(),
        label: repo.to_string(),
        about,
        params: cfg.map(Config::param_counts),
        disk_bytes,
        untrained: false,
        availability,
    }
}

/// The conversion of `bin` in this program's cache, if there is one (found by the blob's hash;
/// nothing is hashed here).
fn converted(env: &HubEnv, bin: &Path) -> Option<PathBuf> {
    ConversionCache::new(env.convert_cache.clone()?).lookup(bin)
}

/// The cached `config.json` of `repo`, if there is one and it is a BlackMamba config.
fn cached_config(env: &HubEnv, repo: &str) -> Option<Config> {
    snapshot_dir(env, repo).and_then(|d| Config::from_file(&d.join("config.json")).ok())
}

/// The snapshot folder `refs/main` points at, if it exists.
fn snapshot_dir(env: &HubEnv, repo: &str) -> Option<PathBuf> {
    cached_snapshot(env, repo, "main")
}

/// Model repos in a hub cache (`models--owner--name`), as `owner/name`, sorted.
pub fn cached_repos(cache_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let rest = name.strip_prefix("models--")?;
            let (owner, repo) = rest.split_once("--")?;
            (!owner.is_empty() && !repo.is_empty()).then(|| format!("{owner}/{repo}"))
        })
        .collect();
    out.sort();
    out
}

/// Splits what was typed into the picker into `--model` and `--revision`: `owner/name@rev` names
/// a hub revision; `random:SHAPE@seed` and existing paths are kept whole.
pub fn split_revision(text: &str) -> (String, Option<String>) {
    let text = text.trim();
    if text.starts_with("random:") || Path::new(text).exists() {
        return (text.to_string(), None);
    }
    match text.rsplit_once('@') {
        Some((model, rev)) if !model.is_empty() && !rev.is_empty() => (model.to_string(), Some(rev.to_string())),
        _ => (text.to_string(), None),
    }
}

/// A byte count as "5.6 GB" / "12 MB".
pub fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// A parameter count as "2.8B" / "10.2M".
pub fn human_count(n: usize) -> String {
    let n = n as f64;
    let (v, unit) = if n >= 1e9 {
        (n / 1e9, "B")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else {
        (n / 1e3, "k")
    };
    // three significant digits at most: 2.8B, 10.2M, 630M
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}
