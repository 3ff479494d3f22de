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
