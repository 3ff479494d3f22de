//! Where the tensors of an OLMoE or Mixtral checkpoint come from: a folder with `model.safetensors`
//! or the shards of `model.safetensors.index.json` (read tensor by tensor from memory maps), or an
//! in-memory map (random models of the tests). Names are those of the Hugging Face checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{Family, MoeConfig};
use crate::error::{Error, Result};
use crate::model::weights::{mmap, WeightFiles};

/// A store of named tensors.
pub trait TensorSource {
    /// Whether a tensor of that name is present.
    fn has(&self, name: &str) -> bool;
    /// The tensor `name`, checked against `shape`, on `device` in `dtype`.
    fn get(&self, name: &str, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor>;
}

/// In-memory tensors by name (a random model, or tensors read elsewhere).
impl TensorSource for HashMap<String, Tensor> {
    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let t = self.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }
}

/// The safetensors files of a checkpoint folder, memory-mapped, with a name → file index built
/// from their headers.
pub struct SafetensorsDir {
    dir: PathBuf,
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, (usize, Vec<usize>)>,
}

fn bad_st(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_file(p, format!("not a valid safetensors file ({e}); re-download it"))
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = match WeightFiles::find(dir)? {
            WeightFiles::Safetensors(p) => p,
            WeightFiles::Pth(p) => {
                return Err(Error::bad_file(
                    p,
                    "OLMoE and Mixtral checkpoints are read from safetensors only; convert pytorch_model.bin or download the .safetensors files",
                ))
            }
        };
        let mut maps = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            let map = mmap(&p)?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad_st(&p, e))?;
            for (name, info) in meta.tensors() {
                if index.insert(name.clone(), (i, info.shape.clone())).is_some() {
                    return Err(Error::bad_file(&p, format!("tensor '{name}' appears in more than one shard")));
                }
            }
            maps.push((p, map));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }
}

impl TensorSource for SafetensorsDir {
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let Some((file, found)) = self.index.get(name) else {
            return Err(Error::bad_file(
                &self.dir,
                format!("checkpoint is missing tensor '{name}' (expected shape {shape:?} from config.json); is config.json from the same checkpoint?"),
            ));
        };
        let (path, map) = &self.maps[*file];
        if found != shape {
            return Err(Error::bad_file(
                path,
                format!("tensor '{name}' has shape {found:?}, expected {shape:?} from config.json"),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| bad_st(path, e))?;
        let view = st.tensor(name).map_err(|e| bad_st(path, e))?;
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| Error::bad_file(path, format!("tensor '{name}': {e}")))?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Every tensor of one decoder layer's experts, (E, I, H) gate and up, (E, H, I) down.
pub struct ExpertWeights {
    /// Router (E, H).
    pub router: Tensor,
    /// Gate projections (E, I, H).
    pub gate: Tensor,
    /// Up projections (E, I, H).
    pub up: Tensor,
    /// Down projections (E, H, I).
    pub down: Tensor,
}

/// The prefix of layer `i`'s mixture-of-experts block as the Hub checkpoints name it.
pub fn moe_prefix(cfg: &MoeConfig, i: usize) -> String {
    match cfg.family {
        Family::Olmoe => format!("model.layers.{i}.mlp"),
        Family::Mixtral => format!("model.layers.{i}.block_sparse_moe"),
    }
}

/// Reads layer `i`'s router and experts: per-expert tensors as on the Hub, or the fused
/// `mlp.experts.gate_up_proj` / `down_proj` of transformers 5 (`save_original_format=False`).
pub fn expert_weights(src: &dyn TensorSource, cfg: &MoeConfig, i: usize, device: &Device, dtype: DType) -> Result<ExpertWeights> {
    let (e, h, n) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
    let hub = moe_prefix(cfg, i);
    let fused = format!("model.layers.{i}.mlp");
    if !src.has(&format!("{hub}.experts.0.{}.weight", names(cfg.family).0)) && src.has(&format!("{fused}.experts.gate_up_proj")) {
        let router_name = if src.has(&format!("{hub}.gate.weight")) {
            format!("{hub}.gate.weight")
        } else {
            format!("{fused}.gate.weight")
        };
        let gate_up = src.get(&format!("{fused}.experts.gate_up_proj"), &[e, 2 * n, h], device, dtype)?;
        return Ok(ExpertWeights {
            router: src.get(&router_name, &[e, h], device, dtype)?,
            gate: gate_up.narrow(1, 0, n)?.contiguous()?,
            up: gate_up.narrow(1, n, n)?.contiguous()?,
            down: src.get(&format!("{fused}.experts.down_proj"), &[e, h, n], device, dtype)?,
        });
    }
    let (g, u, d) = names(cfg.family);
    let stack = |which: &str, shape: &[usize]| -> Result<Tensor> {
        let parts = (0..e)
            .map(|x| src.get(&format!("{hub}.experts.{x}.{which}.weight"), shape, device, dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&parts, 0)?)
    };
    Ok(ExpertWeights {
        router: src.get(&format!("{hub}.gate.weight"), &[e, h], device, dtype)?,
        gate: stack(g, &[n, h])?,
        up: stack(u, &[n, h])?,
        down: stack(d, &[h, n])?,
    })
}

/// The per-expert gate, up and down names of the family.
pub fn names(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::Olmoe => ("gate_proj", "up_proj", "down_proj"),
        Family::Mixtral => ("w1", "w3", "w2"),
    }
}

/// Every tensor of a checkpoint in the Hub layout, with its shape (what a random model holds and
/// what a complete checkpoint has).
pub fn expected_tensors(cfg: &MoeConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    let (g, u, dn) = names(cfg.family);
    for i in 0..cfg.num_hidden_layers {
        let a = format!("model.layers.{i}.self_attn");
        out.push((format!("{a}.q_proj.weight"), vec![q, h]));
        out.push((format!("{a}.k_proj.weight"), vec![kv, h]));
        out.push((format!("{a}.v_proj.weight"), vec![kv, h]));
        out.push((format!("{a}.o_proj.weight"), vec![h, q]));
        if cfg.family == Family::Olmoe {
            out.push((format!("{a}.q_norm.weight"), vec![q]));
            out.push((format!("{a}.k_norm.weight"), vec![kv]));
        }
        out.push((format!("model.layers.{i}.input_layernorm.weight"), vec![h]));
        out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), vec![h]));
        let m = moe_prefix(cfg, i);
        out.push((format!("{m}.gate.weight"), vec![cfg.num_experts, h]));
        for e in 0..cfg.num_experts {
            out.push((format!("{m}.experts.{e}.{g}.weight"), vec![cfg.intermediate_size, h]));
            out.push((format!("{m}.experts.{e}.{u}.weight"), vec![cfg.intermediate_size, h]));
            out.push((format!("{m}.experts.{e}.{dn}.weight"), vec![h, cfg.intermediate_size]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Random weights of the Hub layout (f32, CPU): normal(0, `std`) matrices, norms near one;
/// deterministic for a seed.
pub fn random_tensors(cfg: &MoeConfig, seed: u64, std: f64) -> Result<HashMap<String, Tensor>> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in expected_tensors(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect()
        } else {
            (0..n).map(|_| (std * rng.normal()) as f32).collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}
