//! `eval --task NAME` without `--task-dir`: the task's Hugging Face dataset (the one lm-eval reads,
//! [`Task::hub_dataset`]) in the hub's Parquet conversion (revision `refs/convert/parquet`, files
//! `<config>/<split>/0000.parquet`), through the same hub cache as the models: read from
//! `datasets--owner--name/snapshots/<commit>/<config>/` when cached (offline), downloaded there
//! otherwise unless the environment is offline.

use std::path::PathBuf;

use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result};
use crate::eval::data;
use crate::eval::tasks::Task;
use crate::hub::{commit_in, HubEnv};

/// The hub revision holding every public dataset as Parquet.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// The config folder of `task`'s dataset in the cached Parquet conversion, if it holds `split`.
pub fn cached(env: &HubEnv, task: Task, split: &str) -> Option<PathBuf> {
    let (repo, config) = task.hub_dataset();
    let dir = env.dataset_dir(repo);
    let snap = dir.join("snapshots").join(commit_in(&dir, PARQUET_REVISION)?);
    let folder = snap.join(config.unwrap_or("default"));
    let holds = |f: &PathBuf| matches!(data::find_in(f, split), Some(data::Source::Parquet(_)));
    if holds(&folder) {
        return Some(folder);
    }
    // A dataset of one config whose conversion names it otherwise than `default`.
    let only: Vec<PathBuf> = std::fs::read_dir(&snap)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_dir())
        .collect();
    match (config, only.as_slice()) {
        (None, [one]) if holds(one) => Some(one.clone()),
        _ => None,
    }
}

/// The folder to read `task` from (see [`data::load_folder`]): the cached config folder when it
/// holds the split scored (`split`, else lm-eval's), else the Parquet files of that split and of
/// the few-shot split downloaded into the cache. Offline or unreachable: a one-line error naming
/// the dataset and `--task-dir` as the way round.
pub fn resolve(env: &HubEnv, task: Task, split: Option<&str>) -> Result<PathBuf> {
    let split = split.unwrap_or(task.eval_split());
    if let Some(folder) = cached(env, task, split) {
        return Ok(folder);
    }
    let (repo, config) = task.hub_dataset();
    let config = config.unwrap_or("default");
    let fix = format!(
        "pass --task-dir DIR with {}/{split}.jsonl (or .arrow/.parquet; docs/eval.md)",
        task.name()
    );
    if env.offline {
        return Err(Error::Invalid(format!(
            "{}: dataset {repo} ({config}, {split}) is not in the hub cache {} and HF_HUB_OFFLINE=1; run once online to cache its Parquet files, or {fix}",
            task.name(),
            env.dataset_dir(repo).display()
        )));
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Error::Invalid(format!(
            "{}: {what} dataset {repo} ({config}, {split}) from the hub failed ({e}); check the network and HF_TOKEN, or {fix}",
            task.name()
        ))
    };
    let mut builder = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(env.cache_dir.clone())
        .with_token(env.token.clone())
        .with_progress(true);
    if let Some(e) = &env.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let api = builder.build().map_err(|e| failed("reaching", &e))?;
    let r = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Dataset,
        PARQUET_REVISION.to_string(),
    ));
    let info = r.info().map_err(|e| failed("listing", &e))?;
    let mut configs: Vec<&str> = info
        .siblings
        .iter()
        .filter_map(|f| f.rfilename.split_once('/').map(|c| c.0))
        .collect();
    configs.sort_unstable();
    configs.dedup();
    // A dataset of one config whose conversion names it otherwise than `default`.
    let config = match (task.hub_dataset().1, configs.as_slice()) {
        (None, [one]) => *one,
        _ => config,
    };
    let wanted = |s: &str| format!("{config}/{s}/");
    let mut last = None;
    for s in [split, task.fewshot_split()] {
        let files: Vec<&str> = info
            .siblings
            .iter()
            .map(|f| f.rfilename.as_str())
            .filter(|f| f.starts_with(&wanted(s)) && f.ends_with(".parquet"))
            .collect();
        if files.is_empty() && s == split {
            return Err(Error::Invalid(format!(
                "{}: the hub's Parquet conversion of {repo} has no {config}/{split}; pick another split with --split, or {fix}",
                task.name()
            )));
        }
        for f in files {
            last = Some(r.get(f).map_err(|e| failed("downloading", &e))?);
        }
    }
    // The file is <snapshot>/<config>/<split>/NAME.parquet: its config folder is two levels up.
    last.as_deref()
        .and_then(|p| p.parent()?.parent())
        .map(PathBuf::from)
        .ok_or_else(|| failed("caching", &"no file path"))
}
