//! `config.json` of a transformer mixture-of-experts checkpoint (OLMoE or Mixtral), read with serde
//! and checked once: every later size comes from the checked [`MoeConfig`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architecture family, read from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `allenai/OLMoE-1B-7B-0924` and its kin: QK-norm, softmax router, top-k without
    /// renormalisation unless `norm_topk_prob`.
    Olmoe,
    /// `mistralai/Mixtral-8x7B-v0.1` and its kin: sliding-window attention where configured,
    /// top-k weights always renormalised.
    Mixtral,
}

impl Family {
    /// The `model_type` string of the family.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Olmoe => "olmoe",
            Self::Mixtral => "mixtral",
        }
    }
}

/// The keys of `config.json` this module reads, as they are spelled there (both families).
#[derive(Debug, Clone, Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    sliding_window: Option<usize>,
    clip_qkv: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
}

/// A checked configuration of an OLMoE or Mixtral checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Which architecture.
    pub family: Family,
    /// Vocabulary size (rows of the embedding and of the head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of each expert's SwiGLU.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Experts per layer.
    pub num_experts: usize,
    /// Experts chosen per token (top-k).
    pub num_experts_per_tok: usize,
    /// Whether the chosen experts' probabilities are renormalised to sum to one.
    pub norm_topk_prob: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Attention window (a query sees this many keys, itself included); `None` = full causal.
    pub sliding_window: Option<usize>,
    /// Clamp of q, k and v (OLMoE), if any.
    pub clip_qkv: Option<f64>,
    /// Whether the head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the checkpoint was trained for.
    pub max_position_embeddings: usize,
}

fn need<T>(v: Option<T>, key: &str) -> Result<T> {
    v.ok_or_else(|| Error::config(key, "is missing; is this a Hugging Face OLMoE or Mixtral config.json?"))
}

fn positive(v: usize, key: &str) -> Result<usize> {
    if v == 0 {
        return Err(Error::config(key, "is 0; it must be a positive integer"));
    }
    Ok(v)
}

impl MoeConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { key, problem } => Error::bad_file(&path, format!("key '{key}' {problem}")),
            Error::Invalid(msg) => Error::bad_file(&path, msg.replace("config.json is ", "")),
            other => other,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| Error::Invalid(format!("config.json is not valid JSON of the expected types: {e}")))?;
        let model_type = need(raw.model_type.clone(), "model_type")?;
        let family = match model_type.as_str() {
            "olmoe" => Family::Olmoe,
            "mixtral" => Family::Mixtral,
            other => {
                return Err(Error::config(
                    "model_type",
                    format!("is '{other}'; the transformer mixture-of-experts families are 'olmoe' and 'mixtral'"),
                ))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(Error::config(
                    "hidden_act",
                    format!("is '{act}'; only 'silu' (SwiGLU experts) is supported"),
                ));
            }
        }
        if raw.attention_bias == Some(true) {
            return Err(Error::config(
                "attention_bias",
                "is true; only attention without biases is supported",
            ));
        }
        let hidden_size = positive(need(raw.hidden_size, "hidden_size")?, "hidden_size")?;
        let heads = positive(need(raw.num_attention_heads, "num_attention_heads")?, "num_attention_heads")?;
        let kv_heads = positive(raw.num_key_value_heads.unwrap_or(heads), "num_key_value_heads")?;
        if heads % kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("is {kv_heads}, which does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match (family, raw.head_dim) {
            (Family::Mixtral, Some(d)) => positive(d, "head_dim")?,
            _ => {
                if hidden_size % heads != 0 {
                    return Err(Error::config(
                        "num_attention_heads",
                        format!("is {heads}, which does not divide hidden_size = {hidden_size}"),
                    ));
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config("head_dim", format!("is {head_dim}; RoPE needs an even head width")));
        }
        let experts_key = match family {
            Family::Olmoe => "num_experts",
            Family::Mixtral => "num_local_experts",
        };
        let num_experts = positive(need(raw.num_experts.or(raw.num_local_experts), experts_key)?, experts_key)?;
        let k = positive(need(raw.num_experts_per_tok, "num_experts_per_tok")?, "num_experts_per_tok")?;
        if k > num_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                format!("is {k}, more than the {num_experts} experts ({experts_key})"),
            ));
        }
        let sliding_window = match family {
            // transformers' OLMoE builds a plain causal mask whatever the config says
            Family::Olmoe => None,
            Family::Mixtral => raw.sliding_window.map(|w| positive(w, "sliding_window")).transpose()?,
        };
        Ok(Self {
            family,
            vocab_size: positive(need(raw.vocab_size, "vocab_size")?, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(need(raw.intermediate_size, "intermediate_size")?, "intermediate_size")?,
            num_hidden_layers: positive(need(raw.num_hidden_layers, "num_hidden_layers")?, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            num_experts,
            num_experts_per_tok: k,
            norm_topk_prob: match family {
                Family::Olmoe => raw.norm_topk_prob.unwrap_or(false),
                Family::Mixtral => true,
            },
            rope_theta: rope_theta(&raw)?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            sliding_window,
            clip_qkv: raw.clip_qkv,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
        })
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// The RoPE base: top-level `rope_theta` (the Hub's configs) or `rope_parameters.rope_theta`
/// (what transformers 5 writes); scaled RoPE variants are refused.
fn rope_theta(raw: &Raw) -> Result<f64> {
    for (key, v) in [("rope_scaling", &raw.rope_scaling), ("rope_parameters", &raw.rope_parameters)] {
        if let Some(kind) = v
            .as_ref()
            .and_then(|v| v.get("rope_type").or_else(|| v.get("type")))
            .and_then(|t| t.as_str())
        {
            if kind != "default" {
                return Err(Error::config(
                    key,
                    format!("asks for RoPE type '{kind}'; only the default RoPE is supported"),
                ));
            }
        }
    }
    let nested = raw
        .rope_parameters
        .as_ref()
        .and_then(|v| v.get("rope_theta"))
        .and_then(|t| t.as_f64());
    let theta = raw
        .rope_theta
        .or(nested)
        .ok_or_else(|| Error::config("rope_theta", "is missing (neither top-level nor in rope_parameters)"))?;
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(Error::config("rope_theta", format!("is {theta}; it must be a positive number")));
    }
    Ok(theta)
}
