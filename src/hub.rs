//! Hugging Face hub checkpoints: resolve `owner/name` to a local folder through the hub cache
//! (the standard `models--owner--name/{refs,snapshots,blobs}` layout), downloading what is missing
//! unless offline. The environment (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_HUB_OFFLINE`) is read once into a [`HubEnv`], so tests can pass their own.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The files a BlackMamba hub repo must provide (the Zyphra repos ship exactly these two).
pub const REQUIRED_FILES: &[&str] = &["config.json", "pytorch_model.bin"];

/// Where the hub cache is, whether the network may be used, and how to reach the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

impl HubEnv {
    /// Reads the standard variables: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` for cache only; `HF_ENDPOINT`; `HF_TOKEN`
    /// (else the token file of the cache).
    pub fn from_env() -> Self {
        let cache_dir = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let offline =
            std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| Cache::from_env().token());
        Self {
            cache_dir,
            offline,
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            token,
        }
    }

    /// The folder of one repo in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// Download progress: `(file, bytes done, bytes total)`.
pub type DownloadProgress<'a> = &'a mut dyn FnMut(&str, u64, u64);

struct Bridge<'a, 'b> {
    cb: &'a mut DownloadProgress<'b>,
    file: String,
    done: u64,
    total: u64,
}

impl hf_hub::api::Progress for Bridge<'_, '_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size as u64;
        (self.cb)(&self.file, 0, self.total);
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        (self.cb)(&self.file, self.done, self.total);
    }
    fn finish(&mut self) {
        (self.cb)(&self.file, self.total, self.total);
    }
}

/// Returns the snapshot folder holding the files of `repo` at `revision` (default `main`),
/// downloading the missing ones unless `env.offline`.
pub fn resolve_with(env: &HubEnv, repo: &str, revision: Option<&str>, mut progress: DownloadProgress<'_>) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main").to_string();
    let cache = Cache::new(env.cache_dir.clone());
    let cached = cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone()));
    let missing: Vec<&str> = REQUIRED_FILES.iter().copied().filter(|f| cached.get(f).is_none()).collect();
    if missing.is_empty() {
        return snapshot_of(cached.get("config.json"));
    }
    let where_ = env.repo_dir(repo);
    if env.offline {
        return Err(Error::Invalid(format!(
            "offline (HF_HUB_OFFLINE=1) and {repo}@{rev} is not fully cached: missing {} (looked in {}); download it once online, or point --model at a folder",
            missing.join(", "),
            where_.display()
        )));
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(env.cache_dir.clone())
        .with_token(env.token.clone())
        .with_progress(false);
    if let Some(e) = &env.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let api = builder.build().map_err(|e| Error::Invalid(format!("hub client: {e}")))?;
    let r = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.clone()));
    let mut last = None;
    for f in REQUIRED_FILES {
        let path = match cached.get(f) {
            Some(p) => p,
            None => r
                .download_with_progress(f, Bridge { cb: &mut progress, file: (*f).to_string(), done: 0, total: 0 })
                .map_err(|e| {
                    Error::Invalid(format!(
                        "downloading {f} of {repo}@{rev} failed ({e}); check the network, the repo name and HF_TOKEN, or set HF_HUB_OFFLINE=1 to use only the cache in {}",
                        where_.display()
                    ))
                })?,
        };
        last = Some(path);
    }
    snapshot_of(last)
}

fn snapshot_of(file: Option<PathBuf>) -> Result<PathBuf> {
    file.as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Invalid("hub cache returned a path without a folder".into()))
}

/// [`resolve_with`] using the process environment, printing nothing.
pub fn resolve(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_with(&HubEnv::from_env(), repo, revision, &mut |_, _, _| {})
}
