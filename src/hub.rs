//! Hugging Face hub checkpoints: resolve `owner/name` to a local folder through the hub cache
//! (the standard `models--owner--name/snapshots/<rev>/` layout), downloading what is missing
//! unless `HF_HUB_OFFLINE=1`. Honours `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT` and `HF_TOKEN`.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The files a BlackMamba hub repo provides, in the order they are tried.
const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// The hub cache folder the environment selects.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    Cache::from_env().path().clone()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Returns the snapshot folder holding `config.json` and the weights of `repo` at `revision`.
pub fn resolve(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main").to_string();
    let cache = Cache::new(cache_dir());
    let cached = cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone()));
    let config = cached.get("config.json");
    let weights = WEIGHT_FILES.iter().find_map(|f| cached.get(f));
    if let (Some(c), Some(_)) = (&config, &weights) {
        return c.parent().map(PathBuf::from).ok_or_else(|| Error::Invalid("bad cache path".into()));
    }
    let where_ = cache_dir().join(format!("models--{}", repo.replace('/', "--")));
    if offline() {
        let mut missing = vec![];
        if config.is_none() {
            missing.push("config.json");
        }
        if weights.is_none() {
            missing.push("pytorch_model.bin");
        }
        return Err(Error::Invalid(format!(
            "HF_HUB_OFFLINE=1 and {repo}@{rev} is not fully cached: missing {} under {}; download it once online or point --model at a folder",
            missing.join(" and "),
            where_.display()
        )));
    }
    let token = std::env::var("HF_TOKEN").ok().or_else(|| Cache::new(cache_dir()).token());
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache_dir())
        .with_token(token)
        .with_progress(true)
        .build()
        .map_err(|e| Error::Invalid(format!("hub client: {e}")))?;
    let r = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone()));
    let fail = |f: &str, e: hf_hub::api::sync::ApiError| {
        Error::Invalid(format!("downloading {f} of {repo}@{rev} failed ({e}); check the network, the repo name, HF_TOKEN, or set HF_HUB_OFFLINE=1 to use the cache at {}", where_.display()))
    };
    let cfg = r.get("config.json").map_err(|e| fail("config.json", e))?;
    r.get("pytorch_model.bin").map_err(|e| fail("pytorch_model.bin", e))?;
    cfg.parent()
        .map(PathBuf::from)
        .ok_or_else(|| Error::Invalid("bad cache path".into()))
}
