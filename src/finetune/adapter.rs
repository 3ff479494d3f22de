//! Adapters on disk: `adapter.json` (what was trained, on which base, how far) next to the
//! trained tensors, and `--adapter DIR`, which puts them onto a loaded base model.
//!
//! * method lora: `adapter.safetensors` holds `{linear}.lora_a` (rank, in) and `{linear}.lora_b`
//!   (out, rank), plus `…router.weight` / `.bias` when the router was trained;
//! * method router: `adapter.safetensors` holds the routers;
//! * method full: `model.safetensors` + `config.json` hold the whole model, so the folder is also
//!   a model folder for `--model`.
//!
//! Tensors are f32 (the master copies). Names are the checkpoint names of SPEC §4.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::finetune::lora::{attach, visit_named_linears, Target};
use crate::finetune::Method;
use crate::model::config::Config;
use crate::model::weights::{read_tensors, WeightFiles};
use crate::model::Model;

/// The adapter's JSON file name.
pub const META_FILE: &str = "adapter.json";
/// The tensors of a lora / router adapter.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The tensors of a full fine-tune.
pub const MODEL_FILE: &str = "model.safetensors";

/// `adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub format: String,
    pub method: Method,
    /// What the base model was called when training (a folder, hub id or random:…).
    pub base_model: String,
    /// The base model's config; an adapter only fits a model with the same one.
    pub base_config: Config,
    pub targets: Vec<Target>,
    pub rank: usize,
    pub alpha: f64,
    pub train_router: bool,
    /// Optimiser steps taken.
    pub step: usize,
    /// sha256 of the training data file.
    pub data_hash: String,
    /// The tensors file in the same folder.
    pub weights: String,
}

/// The `format` string of files we write.
pub const FORMAT: &str = "blackmamba-adapter-v1";

impl AdapterMeta {
    /// Reads `DIR/adapter.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        if !path.is_file() {
            return Err(Error::bad_file(
                dir,
                "no adapter.json here; --adapter needs a folder written by `blackmamba finetune` or `train`",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let meta: Self = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("not a valid adapter.json ({e})")))?;
        if meta.format != FORMAT {
            return Err(Error::bad_file(
                &path,
                format!("unknown adapter format '{}' (this build reads {FORMAT})", meta.format),
            ));
        }
        Ok(meta)
    }

    /// Errors unless `cfg` is the config the adapter was trained on.
    pub fn check_base(&self, cfg: &Config, dir: &Path) -> Result<()> {
        if &self.base_config == cfg {
            return Ok(());
        }
        let a = serde_json::to_value(&self.base_config).unwrap_or_default();
        let b = serde_json::to_value(cfg).unwrap_or_default();
        let diffs: Vec<String> = match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k} {v} vs {}", b.get(k).cloned().unwrap_or_default()))
                .collect(),
            _ => vec![],
        };
        Err(Error::Invalid(format!(
            "adapter {} was trained on {} whose config differs from this model's ({}); load it with that base model",
            dir.display(),
            self.base_model,
            diffs.join(", ")
        )))
    }
}

/// Puts the adapter in `dir` onto `model` (adapters attached, replaced tensors swapped in) and
/// returns its metadata. The base must have the config the adapter was trained on.
pub fn apply(model: &mut Model, dir: &Path) -> Result<AdapterMeta> {
    let meta = AdapterMeta::read(dir)?;
    meta.check_base(&model.cfg, dir)?;
    let path = dir.join(&meta.weights);
    if meta.weights.contains(['/', '\\']) || !path.is_file() {
        return Err(Error::bad_file(
            &path,
            "the adapter's tensors file is missing; was the save interrupted?",
        ));
    }
    let tensors = read_tensors(&WeightFiles::Safetensors(vec![path.clone()]), &model.device)?;
    apply_tensors(model, tensors, meta.alpha / meta.rank.max(1) as f64, &path)?;
    Ok(meta)
}

/// [`apply`], then every LoRA folded into its weight (W ← W + scale·B·A, as `merge` writes it):
/// what inference loads (`--adapter` of the commands and the TUI), so the fused kernels and the
/// graph-captured decoder, which take no adapters, run it at full speed.
pub fn apply_merged(model: &mut Model, dir: &Path) -> Result<AdapterMeta> {
    let meta = apply(model, dir)?;
    crate::finetune::lora::merge_all(model)?;
    Ok(meta)
}

/// Applies named tensors: `{linear}.lora_a/_b` pairs become adapters with `scale`, any other name
/// replaces the model's tensor of that name (cast to its dtype). Unknown names are an error.
pub fn apply_tensors(model: &mut Model, mut tensors: HashMap<String, Tensor>, scale: f64, origin: &Path) -> Result<()> {
    visit_named_linears(model, &mut |name, _, l| {
        let a = tensors.remove(&format!("{name}.lora_a"));
        let b = tensors.remove(&format!("{name}.lora_b"));
        match (a, b) {
            (Some(a), Some(b)) => attach(name, l, a, b, scale),
            (None, None) => Ok(()),
            _ => Err(Error::bad_file(origin, format!("'{name}' has only one of lora_a / lora_b"))),
        }
    })?;
    model.visit_mut(&mut |name, t| {
        if let Some(r) = tensors.remove(name) {
            if r.dims() != t.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: t.dims().to_vec(),
                    found: r.dims().to_vec(),
                });
            }
            *t = r.to_dtype(t.dtype())?;
        }
        Ok(())
    })?;
    let mut left: Vec<&String> = tensors.keys().collect();
    left.sort();
    if let Some(name) = left.first() {
        return Err(Error::bad_file(
            origin,
            format!("tensor '{name}' does not belong to this model; the adapter was made for another one"),
        ));
    }
    Ok(())
}
