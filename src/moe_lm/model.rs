//! The decoder-only transformer with sparse mixture-of-experts layers (OLMoE, Mixtral):
//! embedding → layers (RMSNorm, attention, RMSNorm, experts, residuals) → RMSNorm → head, over a
//! run of tokens with a key/value cache, and a probe record per layer.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::attention::{rms_norm, Attention, LayerCache};
use super::config::{Family, MoeConfig};
use super::moe::{Routing, SparseMoe};
use super::weights::{expert_weights, SafetensorsDir, TensorSource};
use crate::error::{Error, Result};

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    moe: SparseMoe,
}

/// The key/value caches of all layers and the position of the next token.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    pos: usize,
}

impl KvCache {
    /// Tokens seen so far (the position of the next one).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Cached key/value positions of layer `i` (at most window − 1 with a sliding window).
    pub fn layer_len(&self, i: usize) -> usize {
        self.layers.get(i).map_or(0, LayerCache::len)
    }

    /// Bytes the keys and values of all layers take on their device.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Forgets everything (a new conversation).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerCache::default());
        self.pos = 0;
    }
}

/// What one layer did for a run of tokens: the routing of every token and the attention's
/// key/value-cache size after the run (the transformer's stand-in for BlackMamba's state norms).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerProbe {
    /// Chosen experts, their probabilities and weights, router entropy, per token.
    pub routing: Routing,
    /// Cached key/value positions of the layer after the run.
    pub kv_len: usize,
}

/// An OLMoE or Mixtral model on one device, in one dtype.
#[derive(Debug, Clone)]
pub struct MoeLm {
    cfg: MoeConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
}

impl MoeLm {
    /// Loads `dir`: `config.json` and `model.safetensors` or the shards of
    /// `model.safetensors.index.json`, onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = MoeConfig::from_dir(dir)?;
        let src = SafetensorsDir::open(dir)?;
        Self::from_source(cfg, &src, device, dtype)
    }

    /// Builds the model from named tensors (Hub names; see [`super::weights::expected_tensors`]).
    pub fn from_source(cfg: MoeConfig, src: &dyn TensorSource, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Invalid(format!(
                "dtype {dtype:?} is not supported for OLMoE/Mixtral; use f32, bf16 or f16"
            )));
        }
        let (h, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let get = |name: &str, shape: &[usize]| src.get(name, shape, device, dtype);
        let embed = get("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let a = format!("model.layers.{i}.self_attn");
            let olmoe = cfg.family == Family::Olmoe;
            let attn = Attention {
                q_proj: get(&format!("{a}.q_proj.weight"), &[q, h])?,
                k_proj: get(&format!("{a}.k_proj.weight"), &[kv, h])?,
                v_proj: get(&format!("{a}.v_proj.weight"), &[kv, h])?,
                o_proj: get(&format!("{a}.o_proj.weight"), &[h, q])?,
                q_norm: if olmoe {
                    Some(get(&format!("{a}.q_norm.weight"), &[q])?)
                } else {
                    None
                },
                k_norm: if olmoe {
                    Some(get(&format!("{a}.k_norm.weight"), &[kv])?)
                } else {
                    None
                },
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: d,
                eps: cfg.rms_norm_eps,
                clip_qkv: cfg.clip_qkv,
                window: cfg.sliding_window,
                rope_theta: cfg.rope_theta,
            };
            let ew = expert_weights(src, &cfg, i, device, dtype)?;
            layers.push(DecoderLayer {
                input_norm: get(&format!("model.layers.{i}.input_layernorm.weight"), &[h])?,
                attn,
                post_norm: get(&format!("model.layers.{i}.post_attention_layernorm.weight"), &[h])?,
                moe: SparseMoe {
                    router: ew.router,
                    gate: ew.gate,
                    up: ew.up,
                    down: ew.down,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                },
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !src.has("lm_head.weight") {
            embed.clone()
        } else {
            get("lm_head.weight", &[v, h])?
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// The checked configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); self.layers.len()],
            pos: 0,
        }
    }

    /// A cache as after `len` tokens, filled with random normal keys and values of the model's
    /// shape and dtype (each layer keeps what its window keeps): the attention of the next token
    /// reads exactly as much as after running `len` real tokens, without the prefill's cost.
    pub fn synthetic_cache(&self, len: usize) -> Result<KvCache> {
        let keep = match self.cfg.sliding_window {
            Some(w) => len.min(w.saturating_sub(1)),
            None => len,
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            if keep == 0 {
                layers.push(LayerCache::default());
                continue;
            }
            let shape = (1, self.cfg.num_key_value_heads, keep, self.cfg.head_dim);
            let k = Tensor::randn(0f32, 1f32, shape, self.device())?.to_dtype(self.dtype())?;
            let v = Tensor::randn(0f32, 1f32, shape, self.device())?.to_dtype(self.dtype())?;
            layers.push(LayerCache::from_kv(k, v)?);
        }
        Ok(KvCache { layers, pos: len })
    }

    /// Runs `ids` after what `cache` holds; returns the logits of every position (T, V) in f32
    /// and one probe record per layer.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<(Tensor, Vec<LayerProbe>)> {
        let (x, probe) = self.hidden_probed(ids, cache)?;
        let logits = x.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?;
        Ok((logits, probe))
    }

    /// Runs one token; returns its logits (V) on the host and one probe record per layer.
    pub fn step(&self, id: u32, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<LayerProbe>)> {
        let (x, probe) = self.hidden_probed(&[id], cache)?;
        let logits = x.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?;
        Ok((logits.flatten_all()?.to_vec1::<f32>()?, probe))
    }

    /// The final-norm hidden states (T, H) of `ids` after the cache, and the probe.
    fn hidden_probed(&self, ids: &[u32], cache: &mut KvCache) -> Result<(Tensor, Vec<LayerProbe>)> {
        if ids.is_empty() {
            return Err(Error::Invalid("no tokens to run: the prompt is empty".to_string()));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::TokenOutOfVocab {
                id: bad,
                vocab: self.cfg.vocab_size,
            });
        }
        if cache.layers.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let idx = Tensor::new(ids, self.device())?;
        let mut x = self.embed.index_select(&idx, 0)?;
        let mut probe = Vec::with_capacity(self.layers.len());
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let a = layer
                .attn
                .forward(&rms_norm(&x, &layer.input_norm, self.cfg.rms_norm_eps)?, cache.pos, lc)?;
            x = (x + a)?;
            let (m, routing) = layer.moe.forward(&rms_norm(&x, &layer.post_norm, self.cfg.rms_norm_eps)?)?;
            x = (x + m)?;
            probe.push(LayerProbe { routing, kv_len: lc.len() });
        }
        cache.pos += ids.len();
        Ok((rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?, probe))
    }
}
