//! `config.json` of a BlackMamba checkpoint (SPEC §1.2), with the derived sizes as methods.
//!
//! The hub file holds exactly the keys that Zyphra's `MambaModel.from_pretrained` reads; every
//! other setting takes the reference's dataclass default (RMSNorm eps 1e-5, residual in f32, conv
//! bias, sigmoid routing, exact GELU in the experts). Two keys of ours may be present:
//! `expert_activation` ("gelu" | "silu") and `layernorm_epsilon`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// What one half-block of the stack is, from its `mamba_moe_layers` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// `"r"`: a Mamba mixer.
    Mamba,
    /// `"1…"`: one dense MLP of `ffn_hidden_size` (used by our dense baseline).
    Dense,
    /// `"2"`..`"9"`: a SwitchMLP with that many experts, top-1.
    Moe { experts: usize },
}

pub use crate::ops::act::Activation;

/// The model configuration: fields mirror `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub state_size: usize,
    pub conv_dimension: usize,
    pub vocab_size: usize,
    pub expansion_factor: usize,
    pub mamba_moe_layers: Vec<String>,
    pub ffn_hidden_size: usize,
    pub add_bias_linear: bool,
    pub swiglu: bool,
    pub max_sequence_length: usize,
    #[serde(default)]
    pub expert_activation: Activation,
    #[serde(default = "default_eps")]
    pub layernorm_epsilon: f64,
}

fn default_eps() -> f64 {
    1e-5
}

/// Reads a key as a positive integer, naming it on failure.
fn get_usize(obj: &serde_json::Map<String, Value>, key: &str, default: Option<usize>) -> Result<usize> {
    match obj.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| Error::config(key, "is missing")),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => usize::try_from(n).map_err(|_| Error::config(key, format!("is too large: {n}"))),
            _ => Err(Error::config(key, format!("must be a positive integer, found {v}"))),
        },
    }
}

fn get_bool(obj: &serde_json::Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::config(key, format!("must be true or false, found {v}"))),
    }
}

impl Config {
    /// Parses `config.json` text, checking every key; errors name the key and the value.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::config("(file)", format!("is not valid JSON: {e}")))?;
        let obj = root.as_object().ok_or_else(|| Error::config("(file)", "must be a JSON object"))?;
        // An earlier hub revision called it `padded_vocab_size`.
        let vocab_key = if obj.contains_key("vocab_size") {
            "vocab_size"
        } else {
            "padded_vocab_size"
        };
        let layers = match obj.get("mamba_moe_layers") {
            None => return Err(Error::config("mamba_moe_layers", "is missing")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(Error::config("mamba_moe_layers", format!("has a non-string entry {other}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => return Err(Error::config("mamba_moe_layers", format!("must be a list, found {v}"))),
        };
        let expert_activation = match obj.get("expert_activation") {
            None | Some(Value::Null) => Activation::Gelu,
            Some(Value::String(s)) if s == "gelu" => Activation::Gelu,
            Some(Value::String(s)) if s == "silu" => Activation::Silu,
            Some(v) => {
                return Err(Error::config(
                    "expert_activation",
                    format!("must be \"gelu\" or \"silu\", found {v}"),
                ))
            }
        };
        let layernorm_epsilon = match obj.get("layernorm_epsilon") {
            None | Some(Value::Null) => default_eps(),
            Some(v) => match v.as_f64() {
                Some(e) if e > 0.0 && e < 1.0 => e,
                _ => {
                    return Err(Error::config(
                        "layernorm_epsilon",
                        format!("must be a small positive number, found {v}"),
                    ))
                }
            },
        };
        let has_ffn = layers.iter().any(|l| !l.starts_with('r'));
        let cfg = Self {
            num_layers: get_usize(obj, "num_layers", None)?,
            hidden_size: get_usize(obj, "hidden_size", None)?,
            state_size: get_usize(obj, "state_size", Some(16))?,
            conv_dimension: get_usize(obj, "conv_dimension", Some(4))?,
            vocab_size: get_usize(obj, vocab_key, None).map_err(|_| {
                Error::config(
                    "vocab_size",
                    format!(
                        "is missing or invalid: {}",
                        obj.get(vocab_key).map_or("absent".into(), Value::to_string)
                    ),
                )
            })?,
            expansion_factor: get_usize(obj, "expansion_factor", Some(2))?,
            ffn_hidden_size: get_usize(obj, "ffn_hidden_size", if has_ffn { None } else { Some(1) })?,
            add_bias_linear: get_bool(obj, "add_bias_linear", false)?,
            swiglu: get_bool(obj, "swiglu", true)?,
            max_sequence_length: get_usize(obj, "max_sequence_length", Some(2048))?,
            mamba_moe_layers: layers,
            expert_activation,
            layernorm_epsilon,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { key, problem } => Error::bad_file(path, format!("key '{key}' {problem}")),
            other => other,
        })
    }

    /// Serialises to the hub's JSON layout (our extra keys only when they differ from the default).
    pub fn to_json_string(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Invalid(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            if self.expert_activation == Activation::Gelu {
                obj.remove("expert_activation");
            }
            if (self.layernorm_epsilon - default_eps()).abs() < f64::EPSILON {
                obj.remove("layernorm_epsilon");
            }
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Checks that the sizes agree with each other and that every layer code is known.
    pub fn validate(&self) -> Result<()> {
        if self.mamba_moe_layers.len() != self.num_layers {
            return Err(Error::config(
                "mamba_moe_layers",
                format!("has {} entries but num_layers is {}", self.mamba_moe_layers.len(), self.num_layers),
            ));
        }
        for i in 0..self.num_layers {
            self.layer_kind_checked(i)?;
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::config("vocab_size", format!("is too large: {}", self.vocab_size)));
        }
        // Far above any real model, low enough that every size derived from the config (and the
        // parameter count) fits in usize arithmetic: a config.json is untrusted input.
        for (key, value, max) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("ffn_hidden_size", self.ffn_hidden_size, 1 << 20),
            ("state_size", self.state_size, 1 << 12),
            ("conv_dimension", self.conv_dimension, 1 << 10),
            ("expansion_factor", self.expansion_factor, 1 << 6),
            ("num_layers", self.num_layers, 1 << 12),
        ] {
            if value > max {
                return Err(Error::config(key, format!("is {value}, more than the {max} any real model uses")));
            }
        }
        Ok(())
    }

    fn layer_kind_checked(&self, i: usize) -> Result<LayerKind> {
        let code = &self.mamba_moe_layers[i];
        let bad = |why: &str| Error::config("mamba_moe_layers", format!("entry {i} = \"{code}\": {why}"));
        let first = code.chars().next().ok_or_else(|| bad("is empty"))?;
        match first {
            'r' if code.len() == 1 => Ok(LayerKind::Mamba),
            'r' => Err(bad("parallel Mamba+MLP blocks (\"rN\") are not supported; use \"r\"")),
            '1' => Ok(LayerKind::Dense),
            c if c.is_ascii_digit() => {
                if !code.chars().all(|c| c.is_ascii_digit()) {
                    return Err(bad("unknown layer code; expected \"r\", \"1\" or an expert count 2..9"));
                }
                // The reference reads the expert count from the last character.
                let experts = code.chars().last().and_then(|c| c.to_digit(10)).unwrap_or(0) as usize;
                if experts < 2 {
                    return Err(bad("an MoE layer needs 2..9 experts"));
                }
                Ok(LayerKind::Moe { experts })
            }
            _ => Err(bad("unknown layer code; expected \"r\", \"1\" or an expert count 2..9")),
        }
    }

    /// The kind of half-block `i` (0-based). The config is validated at construction.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        self.layer_kind_checked(i).unwrap_or(LayerKind::Mamba)
    }

    /// d_inner = expansion_factor · hidden_size.
    pub fn d_inner(&self) -> usize {
        self.expansion_factor * self.hidden_size
    }

    /// dt_rank = ceil(hidden_size / 16), hard-wired "auto" in the reference.
    pub fn dt_rank(&self) -> usize {
        self.hidden_size.div_ceil(16)
    }

    /// Rows of `x_proj`: dt_rank + 2·state_size.
    pub fn x_proj_rows(&self) -> usize {
        self.dt_rank() + 2 * self.state_size
    }

    /// Rows of an expert's `linear_fc1`: 2·ffn with gating (swiglu), ffn without.
    pub fn fc1_rows(&self) -> usize {
        if self.swiglu {
            2 * self.ffn_hidden_size
        } else {
            self.ffn_hidden_size
        }
    }

    /// Indices of the Mamba half-blocks.
    pub fn mamba_layers(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|&i| self.layer_kind(i) == LayerKind::Mamba).collect()
    }

    /// Indices of the MoE half-blocks with their expert counts.
    pub fn moe_layers(&self) -> Vec<(usize, usize)> {
        (0..self.num_layers)
            .filter_map(|i| match self.layer_kind(i) {
                LayerKind::Moe { experts } => Some((i, experts)),
                _ => None,
            })
            .collect()
    }

    /// The largest expert count of any MoE layer (0 without MoE layers).
    pub fn max_experts(&self) -> usize {
        self.moe_layers().iter().map(|&(_, e)| e).max().unwrap_or(0)
    }

    /// The released BlackMamba-1.5B shapes (SPEC §1.1).
    pub fn blackmamba_1_5b() -> Self {
        Self::released(1152, 30, 3072)
    }

    /// The released BlackMamba-2.8B shapes (SPEC §1.1).
    pub fn blackmamba_2_8b() -> Self {
        Self::released(1472, 36, 3872)
    }

    fn released(d: usize, layers: usize, ffn: usize) -> Self {
        Self {
            num_layers: layers,
            hidden_size: d,
            state_size: 16,
            conv_dimension: 4,
            vocab_size: 50304,
            expansion_factor: 2,
            mamba_moe_layers: (0..layers).map(|i| if i % 2 == 0 { "r".into() } else { "8".into() }).collect(),
            ffn_hidden_size: ffn,
            add_bias_linear: false,
            swiglu: true,
            max_sequence_length: 2048,
            expert_activation: Activation::Gelu,
            layernorm_epsilon: default_eps(),
        }
    }

    /// Total and active (per token) parameter counts.
    pub fn param_counts(&self) -> (usize, usize) {
        let d = self.hidden_size;
        let di = self.d_inner();
        let (n, k, r) = (self.state_size, self.conv_dimension, self.dt_rank());
        let bias = usize::from(self.add_bias_linear);
        let mamba = 2 * d * di + bias * 2 * di + di * k + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d + bias * d + d;
        let expert = d * self.fc1_rows() + self.ffn_hidden_size * d + bias * (self.fc1_rows() + d);
        let (mut total, mut active) = (self.vocab_size * d + 2 * d, self.vocab_size * d + 2 * d);
        for i in 0..self.num_layers {
            match self.layer_kind(i) {
                LayerKind::Mamba => {
                    total += mamba;
                    active += mamba;
                }
                LayerKind::Dense => {
                    total += expert + d;
                    active += expert + d;
                }
                LayerKind::Moe { experts } => {
                    total += experts * expert + experts * d + experts + d;
                    active += expert + experts * d + experts + d;
                }
            }
        }
        (total, active)
    }
}
