//! Hugging Face hub checkpoints: resolve `owner/name` to a local folder through the hub cache
//! (the standard `models--owner--name/{refs,snapshots,blobs}` layout), downloading what is missing
//! unless offline. Revisions resolve in the cache exactly as Python's `huggingface_hub` resolves
//! them, so caches it filled work offline: a ref name (`main`, a tag, `refs/pr/1`) is read from
//! `refs/<name>`; anything else (a commit sha) names `snapshots/<sha>` itself.
//!
//! The environment (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`, and
//! `XDG_CACHE_HOME` / `HOME` for this program's own conversion cache) is read once, at the edge
//! (`commands::environment::hub_env`), into a [`HubEnv`] handed down, so tests pass their own.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

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
    /// This program's own cache of pickle -> safetensors conversions
    /// ([`crate::model::convert::ConversionCache`]); `None`: read `pytorch_model.bin` directly.
    pub convert_cache: Option<PathBuf>,
}

impl HubEnv {
    /// The folder of one repo in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The folder of one dataset repo in the cache (`datasets--owner--name`).
    pub fn dataset_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("datasets--{}", repo.replace('/', "--")))
    }
}

/// `$XDG_CACHE_HOME/blackmamba` (an absolute `XDG_CACHE_HOME` only, as the XDG spec asks), else
/// `$HOME/.cache/blackmamba`, else none.
pub fn default_convert_cache(xdg_cache_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let xdg = xdg_cache_home.map(PathBuf::from).filter(|p| p.is_absolute());
    let base = xdg.or_else(|| home.filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("blackmamba"))
}

/// Whether `revision` can name a file under `refs/` or `snapshots/` without leaving them.
fn safe_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.starts_with('/')
        && !revision.contains('\\')
        && Path::new(revision)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The commit a revision names in the cache: the content of `refs/<revision>` when that file
/// exists, else the revision itself (a commit sha), as Python's `huggingface_hub` does.
pub fn cached_commit(env: &HubEnv, repo: &str, revision: &str) -> Option<String> {
    commit_in(&env.repo_dir(repo), revision)
}

/// [`cached_commit`] in the cache folder `dir` of any repo (model or dataset).
pub fn commit_in(dir: &Path, revision: &str) -> Option<String> {
    if !safe_revision(revision) {
        return None;
    }
    let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    (!commit.is_empty() && !commit.contains(['/', '\\']) && !commit.starts_with('.')).then_some(commit)
}

/// The snapshot folder of `repo` at `revision` in the cache, if it exists (see [`cached_commit`]).
pub fn cached_snapshot(env: &HubEnv, repo: &str, revision: &str) -> Option<PathBuf> {
    let commit = cached_commit(env, repo, revision)?;
    let snap = env.repo_dir(repo).join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
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
    if !safe_revision(&rev) {
        return Err(Error::Invalid(format!(
            "--revision {rev}: not a branch, tag or commit name; use e.g. main or a 40-character commit sha"
        )));
    }
    let snap = cached_snapshot(env, repo, &rev);
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| snap.as_ref().is_none_or(|d| !d.join(f).is_file()))
        .collect();
    if let (Some(snap), true) = (&snap, missing.is_empty()) {
        return Ok(snap.clone());
    }
    let where_ = env.repo_dir(repo);
    if env.offline {
        let snaps = cached_snapshot_names(&where_);
        let hint = if snaps.is_empty() {
            String::new()
        } else {
            format!(" (cached snapshots: {})", snaps.join(", "))
        };
        return Err(Error::Invalid(format!(
            "offline (HF_HUB_OFFLINE=1) and {repo}@{rev} is not fully cached: missing {} (looked in {}{hint}); download it once online, pass a cached commit to --revision, or point --model at a folder",
            missing.join(", "),
            snap.as_deref().unwrap_or(&where_).display(),
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
        let path = match snap.as_ref().map(|d| d.join(f)).filter(|p| p.is_file()) {
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

/// The snapshot folders of a repo's cache, sorted (at most five, for hints).
fn cached_snapshot_names(repo_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_dir.join("snapshots"))
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names.truncate(5);
    names
}

fn snapshot_of(file: Option<PathBuf>) -> Result<PathBuf> {
    file.as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Invalid("hub cache returned a path without a folder".into()))
}
