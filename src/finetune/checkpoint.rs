//! Checkpoint folders: the trained tensors (see [`crate::finetune::adapter`]), `optimizer.safetensors`
//! (AdamW moments), `trainer_state.json` (step, data position, config) and `adapter.json`.
//!
//! Every file is written to a temporary name first and renamed into place once all of them are
//! complete, so a crash while writing leaves the previous checkpoint. Each file records the step,
//! and loading checks that they agree, so a save cut between two renames is detected rather than
//! resumed from silently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::finetune::adapter::{AdapterMeta, META_FILE};
use crate::finetune::data::DataCursor;
use crate::finetune::optim::Param;
use crate::finetune::FinetuneConfig;
use crate::model::weights::{read_tensors, tmp_path, WeightFiles};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The format string of `trainer_state.json`.
pub const FORMAT: &str = "blackmamba-trainer-v1";

/// `trainer_state.json`: where the run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    /// Optimiser steps done.
    pub step: usize,
    /// The next micro-batch's place in the data.
    pub cursor: DataCursor,
    /// AdamW's update count.
    pub adam_t: u64,
    /// sha256 of the training data file.
    pub data_hash: String,
    /// The trainable tensors, in optimiser order.
    pub params: Vec<String>,
    pub config: FinetuneConfig,
    /// Loss of the last step, for the status line of a resumed run.
    pub last_loss: Option<f64>,
}

/// Files of one checkpoint, ready to be written.
pub struct CheckpointFiles {
    /// File name in the folder -> tensors (moved to the host here).
    pub tensors: Vec<(String, HashMap<String, Tensor>)>,
    /// File name -> bytes (JSON, tokenizer).
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// Writes the files into `dir`: all to temporary names, then renamed in order (tensors first,
/// `trainer_state.json` last).
pub fn write(dir: &Path, files: CheckpointFiles) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let result = (|| -> Result<()> {
        for (name, map) in &files.tensors {
            let path = dir.join(name);
            let tmp = tmp_path(&path);
            let host: HashMap<String, Tensor> = map
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
                .collect::<Result<_>>()?;
            candle_core::safetensors::save(&host, &tmp).map_err(|e| Error::bad_file(&tmp, e.to_string()))?;
            staged.push((tmp, path));
        }
        for (name, bytes) in &files.blobs {
            let path = dir.join(name);
            let tmp = tmp_path(&path);
            std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
            staged.push((tmp, path));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, path) in staged {
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// The optimiser tensors: `{name}.exp_avg`, `{name}.exp_avg_sq` and `step` (I64, 1).
pub fn optimizer_tensors(names: &[String], moments: &[(Tensor, Tensor)], step: usize) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (n, (m, v)) in names.iter().zip(moments) {
        map.insert(format!("{n}.exp_avg"), m.clone());
        map.insert(format!("{n}.exp_avg_sq"), v.clone());
    }
    map.insert("step".into(), Tensor::from_vec(vec![step as i64], 1, &Device::Cpu)?);
    Ok(map)
}

/// A checkpoint read back for resuming.
pub struct Loaded {
    pub state: TrainerState,
    pub meta: AdapterMeta,
    /// The trained tensors by name (f32).
    pub weights: HashMap<String, Tensor>,
    /// (m, v) per parameter of `state.params`, in order.
    pub moments: Vec<(Tensor, Tensor)>,
}

/// Reads the checkpoint in `dir` onto `device`, checking that its files belong together.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let state = read_state(dir)?;
    load_with(dir, device, state)
}

/// Reads `dir/trainer_state.json` alone (the run's settings and position).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(Error::bad_file(
            dir,
            "no trainer_state.json here; --resume needs the --out folder of an earlier finetune/train run",
        ));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, format!("not a valid trainer state ({e})")))?;
    if state.format != FORMAT {
        return Err(Error::bad_file(
            &state_path,
            format!("unknown format '{}' (this build reads {FORMAT})", state.format),
        ));
    }
    Ok(state)
}

fn load_with(dir: &Path, device: &Device, state: TrainerState) -> Result<Loaded> {
    let meta = AdapterMeta::read(dir)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut opt = read_tensors(&WeightFiles::Safetensors(vec![opt_path.clone()]), device)?;
    let opt_step = opt
        .remove("step")
        .map(|t| t.to_dtype(DType::I64).and_then(|t| t.to_vec1::<i64>()))
        .transpose()?
        .and_then(|v| v.first().copied());
    if meta.step != state.step || opt_step != Some(state.step as i64) {
        return Err(Error::bad_file(
            dir,
            format!(
                "checkpoint files disagree (trainer_state step {}, {META_FILE} step {}, optimizer step {:?}); the last save was cut short — resume from a copy or start again",
                state.step, meta.step, opt_step
            ),
        ));
    }
    let mut moments = Vec::with_capacity(state.params.len());
    for n in &state.params {
        let (Some(m), Some(v)) = (opt.remove(&format!("{n}.exp_avg")), opt.remove(&format!("{n}.exp_avg_sq"))) else {
            return Err(Error::bad_file(&opt_path, format!("no optimiser state for '{n}'")));
        };
        moments.push((m, v));
    }
    let wpath = dir.join(&meta.weights);
    let weights = read_tensors(&WeightFiles::Safetensors(vec![wpath]), device)?;
    Ok(Loaded {
        state,
        meta,
        weights,
        moments,
    })
}

/// Whether two paths name the same folder.
pub fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Pretty JSON bytes of a checkpoint file.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(format!("serialising a checkpoint file: {e}")))
}

/// Errors unless the checkpoint was made by a run this one can continue.
pub fn check_resumable(st: &TrainerState, cfg: &FinetuneConfig, data_hash: &str, params: &[Param], dir: &std::path::Path) -> Result<()> {
    let old = &st.config;
    let mismatch = |what: &str, a: String, b: String| {
        Err(Error::Invalid(format!(
            "--resume {}: the checkpoint used {what} {a}, this run {b}; use the same setting to continue it",
            dir.display()
        )))
    };
    if old.method != cfg.method || old.objective != cfg.objective {
        return mismatch("--method", old.method_label(), cfg.method_label());
    }
    if old.objective == crate::finetune::Objective::Dpo && (old.dpo_loss != cfg.dpo_loss || old.dpo_beta != cfg.dpo_beta) {
        return mismatch(
            "--dpo-loss/--beta",
            format!("{}/{}", old.dpo_loss.name(), old.dpo_beta),
            format!("{}/{}", cfg.dpo_loss.name(), cfg.dpo_beta),
        );
    }
    if st.data_hash != data_hash {
        return mismatch("data with sha256", st.data_hash.clone(), data_hash.to_string());
    }
    if old.seq_len != cfg.seq_len {
        return mismatch("--seq-len", old.seq_len.to_string(), cfg.seq_len.to_string());
    }
    if old.seed != cfg.seed {
        return mismatch("--seed", old.seed.to_string(), cfg.seed.to_string());
    }
    if old.eval_data != cfg.eval_data || old.eval_fraction != cfg.eval_fraction {
        return mismatch("held-out data", format!("{:?}", old.eval_data), format!("{:?}", cfg.eval_data));
    }
    let names: Vec<&String> = params.iter().map(|p| &p.name).collect();
    if st.params.iter().collect::<Vec<_>>() != names {
        return mismatch(
            "trainable tensors",
            format!("{} ({:?} rank {})", st.params.len(), old.targets, old.rank),
            format!("{} ({:?} rank {})", names.len(), cfg.targets, cfg.rank),
        );
    }
    if old.rank != cfg.rank || old.alpha != cfg.alpha {
        return mismatch(
            "--rank/--alpha",
            format!("{}/{}", old.rank, old.alpha),
            format!("{}/{}", cfg.rank, cfg.alpha),
        );
    }
    Ok(())
}
