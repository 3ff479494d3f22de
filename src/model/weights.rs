//! Checkpoint files -> named tensors, checked against the names and shapes that `config.json`
//! implies (SPEC §4). Reads `pytorch_model.bin` (torch zip pickle, state dict under `"model"`) and
//! `*.safetensors` (one file, or shards listed in `model.safetensors.index.json`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Config, LayerKind};
use crate::model::pth;

// The atomic-write helpers live in `crate::fsutil` (so `pth_write` need not import this module);
// re-exported here for the callers that still name them by this path.
pub use crate::fsutil::{tmp_path, write_atomic};

/// Name -> expected shape of every tensor in a checkpoint of this config, in file order.
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let di = cfg.d_inner();
    let bias = cfg.add_bias_linear;
    let mut out: Vec<(String, Vec<usize>)> = vec![("embedding.word_embeddings.weight".into(), vec![cfg.vocab_size, d])];
    for i in 0..cfg.num_layers {
        let p = format!("decoder.layers.{i}");
        out.push((format!("{p}.norm.weight"), vec![d]));
        let m = format!("{p}.mixer");
        let mlp = |out: &mut Vec<(String, Vec<usize>)>, q: &str| {
            out.push((format!("{q}.linear_fc1.weight"), vec![cfg.fc1_rows(), d]));
            if bias {
                out.push((format!("{q}.linear_fc1.bias"), vec![cfg.fc1_rows()]));
            }
            out.push((format!("{q}.linear_fc2.weight"), vec![d, cfg.ffn_hidden_size]));
            if bias {
                out.push((format!("{q}.linear_fc2.bias"), vec![d]));
            }
        };
        match cfg.layer_kind(i) {
            LayerKind::Mamba => {
                out.push((format!("{m}.A_log"), vec![di, cfg.state_size]));
                out.push((format!("{m}.D"), vec![di]));
                out.push((format!("{m}.in_proj.weight"), vec![2 * di, d]));
                if bias {
                    out.push((format!("{m}.in_proj.bias"), vec![2 * di]));
                }
                out.push((format!("{m}.conv1d.weight"), vec![di, 1, cfg.conv_dimension]));
                out.push((format!("{m}.conv1d.bias"), vec![di]));
                out.push((format!("{m}.x_proj.weight"), vec![cfg.x_proj_rows(), di]));
                out.push((format!("{m}.dt_proj.weight"), vec![di, cfg.dt_rank()]));
                out.push((format!("{m}.dt_proj.bias"), vec![di]));
                out.push((format!("{m}.out_proj.weight"), vec![d, di]));
                if bias {
                    out.push((format!("{m}.out_proj.bias"), vec![d]));
                }
            }
            LayerKind::Dense => mlp(&mut out, &m),
            LayerKind::Moe { experts } => {
                out.push((format!("{m}.router.weight"), vec![experts, d]));
                out.push((format!("{m}.router.bias"), vec![experts]));
                for e in 0..experts {
                    mlp(&mut out, &format!("{m}.local_experts.{e}"));
                }
            }
        }
    }
    out.push(("decoder.final_layernorm.weight".into(), vec![d]));
    out.push(("decoder.final_layernorm.bias".into(), vec![d]));
    out
}

/// Names whose tensors stay in f32 whatever the model dtype (SPEC §9: A_log, D, norms; the
/// router and dt bias are tiny and feed an argmax / a softplus, so they stay exact too).
pub fn keeps_f32(name: &str) -> bool {
    name.ends_with("A_log")
        || name.ends_with(".D")
        || name.contains("norm")
        || name.contains("router")
        || name.ends_with("dt_proj.bias")
        || name.ends_with("conv1d.weight")
        || name.ends_with("conv1d.bias")
}

/// The weight files of a model directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    Safetensors(Vec<PathBuf>),
    Pth(PathBuf),
}

/// The names [`WeightFiles::find`] looks for, in order.
pub const WEIGHT_NAMES: [&str; 3] = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"];

impl WeightFiles {
    /// Finds the weights in `dir` by name, never by guessing: `model.safetensors`, else the shards
    /// listed in `model.safetensors.index.json`, else `pytorch_model.bin`. Any other
    /// `.safetensors` file (a reference output, an adapter, an unrelated download) is never taken
    /// for the weights. A `model.safetensors` that an earlier version of this program converted
    /// from the `pytorch_model.bin` beside it is skipped once that `.bin` has changed.
    pub fn find(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHT_NAMES[0]);
        let bin = dir.join(WEIGHT_NAMES[2]);
        if single.is_file() && !(bin.is_file() && crate::model::convert::legacy_conversion_is_stale(dir)) {
            return Ok(Self::Safetensors(vec![single]));
        }
        let index = dir.join(WEIGHT_NAMES[1]);
        if index.is_file() {
            return Ok(Self::Safetensors(read_index(&index)?));
        }
        if bin.is_file() {
            return Ok(Self::Pth(bin));
        }
        let mut others: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        others.sort();
        if !others.is_empty() {
            return Err(Error::bad_file(
                dir,
                format!(
                    "no weights found: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin; {} is not taken for the weights: if it holds this model, rename it to model.safetensors",
                    others.join(", ")
                ),
            ));
        }
        Err(Error::bad_file(
            dir,
            "no weights found: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
        ))
    }

    /// The file that errors name: the weights file, or for shards their index.
    pub fn primary(&self) -> PathBuf {
        match self {
            Self::Pth(p) => p.clone(),
            Self::Safetensors(v) if v.len() == 1 => v[0].clone(),
            Self::Safetensors(v) => v.first().and_then(|p| p.parent()).unwrap_or(Path::new(".")).join(WEIGHT_NAMES[1]),
        }
    }

    /// `e`, naming [`Self::primary`] when it does not name a file already (a missing or
    /// misshapen tensor, a tensor-library error).
    pub fn name_in(&self, e: Error) -> Error {
        match e {
            Error::BadFile { .. } | Error::Io { .. } => e,
            other => Error::bad_file(self.primary(), other.to_string()),
        }
    }
}

fn read_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "has no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| Error::bad_file(index, format!("weight_map entry '{name}' is not a file name")))?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(Error::bad_file(
                index,
                format!("weight_map entry '{name}' names a file outside the folder: '{f}'"),
            ));
        }
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::bad_file(f, "shard listed in model.safetensors.index.json is missing"));
        }
    }
    files.sort();
    Ok(files)
}

/// A read-only memory map of a weights file.
#[allow(unsafe_code)]
pub fn mmap(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only while we copy tensors out of it; a file changed
    // underneath by another process gives wrong bytes (caught by the shape/size checks), not UB in
    // our code paths beyond what any reader of a mutating file sees.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn bad_st(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_file(p, format!("not a valid safetensors file ({e}); re-download or re-convert it"))
}

/// Parses a whole safetensors file held in memory and reads every tensor onto the CPU; returns
/// the names and shapes. The entry point of the safetensors reader for the fuzz target and tests.
pub fn parse_safetensors(bytes: &[u8]) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let t: Tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| format!("tensor '{name}': {e}"))?;
        out.push((name, t.dims().to_vec()));
    }
    Ok(out)
}

/// Names and shapes of every tensor in the files, read from headers only (no tensor data).
pub fn tensor_index(files: &WeightFiles) -> Result<Vec<(String, Vec<usize>)>> {
    match files {
        WeightFiles::Pth(path) => Ok(pth::PthIndex::open(path, Some("model"))?
            .entries
            .into_iter()
            .map(|(n, i)| (n, i.shape))
            .collect()),
        WeightFiles::Safetensors(paths) => {
            let mut out = Vec::new();
            for p in paths {
                let map = mmap(p)?;
                let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad_st(p, e))?;
                for (name, info) in meta.tensors() {
                    out.push((name, info.shape.clone()));
                }
            }
            Ok(out)
        }
    }
}

/// Checks names and shapes from the files' headers against the config before reading any data:
/// the first missing, unexpected or misshapen tensor is the error.
pub fn check_index(cfg: &Config, index: &[(String, Vec<usize>)]) -> Result<()> {
    let found: HashMap<&str, &Vec<usize>> = index.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let expected = expected_tensors(cfg);
    for (name, shape) in &expected {
        match found.get(name.as_str()) {
            None => {
                return Err(Error::MissingTensor {
                    name: name.clone(),
                    expected: shape.clone(),
                })
            }
            Some(s) if *s != shape => {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: (*s).clone(),
                })
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<_> = index
        .iter()
        .filter(|(n, _)| !known.contains(n.as_str()) && !is_tied_alias(n))
        .collect();
    extra.sort();
    if let Some((name, shape)) = extra.first() {
        return Err(Error::UnexpectedTensor {
            name: name.clone(),
            found: shape.clone(),
        });
    }
    Ok(())
}

/// The torch model's own names of the tied embedding / head, present in files saved from a live
/// model; they duplicate `embedding.word_embeddings.weight` and are ignored.
fn is_tied_alias(name: &str) -> bool {
    name == "output_layer.weight" || name == "embedding.weight"
}

/// Reads every tensor of the files onto `device`, as stored (dtype conversion happens later);
/// `each(done, total)` is called after each tensor.
pub fn read_tensors_with(files: &WeightFiles, device: &Device, each: &mut dyn FnMut(usize, usize)) -> Result<HashMap<String, Tensor>> {
    match files {
        WeightFiles::Pth(path) => pth::PthIndex::open(path, Some("model"))?.read_all(device, each),
        WeightFiles::Safetensors(paths) => {
            let maps = paths.iter().map(|p| mmap(p).map(|m| (p, m))).collect::<Result<Vec<_>>>()?;
            let total: usize = maps
                .iter()
                .map(|(p, m)| {
                    safetensors::SafeTensors::read_metadata(m)
                        .map(|(_, meta)| meta.tensors().len())
                        .map_err(|e| bad_st(p, e))
                })
                .sum::<Result<usize>>()?;
            let mut out = HashMap::new();
            for (p, map) in &maps {
                let st = safetensors::SafeTensors::deserialize(map).map_err(|e| bad_st(p, e))?;
                for (name, view) in st.tensors() {
                    if is_tied_alias(&name) {
                        continue;
                    }
                    let t = candle_core::safetensors::Load::load(&view, device)
                        .map_err(|e| Error::bad_file(*p, format!("tensor '{name}': {e}")))?;
                    if out.insert(name.clone(), t).is_some() {
                        return Err(Error::bad_file(*p, format!("tensor '{name}' appears in more than one shard")));
                    }
                    each(out.len(), total);
                }
            }
            Ok(out)
        }
    }
}

/// Reads every tensor of the files onto `device`, as stored.
pub fn read_tensors(files: &WeightFiles, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_tensors_with(files, device, &mut |_, _| {})
}

/// Checks names and shapes against the config, then converts each tensor to the dtype it is
/// computed in: `dtype` for matrices, f32 for what [`keeps_f32`] names.
pub fn check_and_convert(cfg: &Config, mut tensors: HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let expected = expected_tensors(cfg);
    let mut out = HashMap::with_capacity(expected.len());
    for (name, shape) in &expected {
        let t = tensors.remove(name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            expected: shape.clone(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        let want = if keeps_f32(name) { DType::F32 } else { dtype };
        out.insert(name.clone(), t.to_dtype(want)?);
    }
    tensors.retain(|n, _| !is_tied_alias(n));
    let leftover: BTreeMap<_, _> = tensors.into_iter().collect();
    if let Some((name, t)) = leftover.into_iter().next() {
        return Err(Error::UnexpectedTensor {
            name,
            found: t.dims().to_vec(),
        });
    }
    Ok(out)
}

/// Writes tensors as one safetensors file, atomically (temp file + rename).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::bad_file(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
