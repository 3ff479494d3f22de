//! The interpreter's inputs in the layout the kernel will stream: f32 host copies of a
//! [`Model`]'s weights, with the split-K matrices (x_proj, out_proj, fc2) transposed so that a
//! tile's rows (its own channels or hidden units) are contiguous, and the recurrent state as
//! flat per-layer vectors.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Activation, Config};
use crate::model::linear::Linear;
use crate::model::moe::Mlp;
use crate::model::state::State;
use crate::model::{Mixer, Model};

use super::isa::WeightFormat;
use super::pack::roundtrip;
use super::schedule::FormatPlan;

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// (rows, cols) row-major -> (cols, rows) row-major.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// A linear layer's weight and bias, refusing an unmerged adapter (the kernel streams one matrix).
fn linear(l: &Linear, what: &str, layer: usize) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    if l.lora.is_some() {
        return Err(Error::Invalid(format!(
            "megakernel: layer {layer} {what} has an unmerged adapter; merge it into the weights first"
        )));
    }
    Ok((host(&l.weight)?, l.bias.as_ref().map(host).transpose()?))
}

/// One Mamba mixer.
#[derive(Debug, Clone)]
pub struct MambaW {
    pub norm: Vec<f32>,
    /// (2·d_inner, d): u rows then z rows
    pub in_w: Vec<f32>,
    pub in_b: Option<Vec<f32>>,
    /// (d_inner, K), (d_inner)
    pub conv_w: Vec<f32>,
    pub conv_b: Vec<f32>,
    /// (d_inner, dt_rank + 2N): x_projᵀ
    pub x_t: Vec<f32>,
    /// (d_inner, dt_rank), (d_inner)
    pub dt_w: Vec<f32>,
    pub dt_b: Vec<f32>,
    /// (d_inner, N): A = −exp(A_log)
    pub a: Vec<f32>,
    /// (d_inner)
    pub d_skip: Vec<f32>,
    /// (d_inner, d): out_projᵀ
    pub out_t: Vec<f32>,
    pub out_b: Option<Vec<f32>>,
}

/// One expert or dense MLP.
#[derive(Debug, Clone)]
pub struct MlpW {
    /// (fc1 rows, d): the gate half then the up half when gated
    pub fc1: Vec<f32>,
    pub fc1_b: Option<Vec<f32>>,
    /// (ffn, d): fc2ᵀ
    pub fc2_t: Vec<f32>,
    pub fc2_b: Option<Vec<f32>>,
}

/// One half-block's weights.
#[derive(Debug, Clone)]
pub enum LayerW {
    Mamba(MambaW),
    Moe {
        norm: Vec<f32>,
        /// (E, d), (E)
        router_w: Vec<f32>,
        router_b: Vec<f32>,
        experts: Vec<MlpW>,
    },
    Dense {
        norm: Vec<f32>,
        mlp: MlpW,
    },
}

/// Every weight of a model, f32, in the kernel's layout.
#[derive(Debug, Clone)]
pub struct HostWeights {
    /// (V, d): the embedding and the tied head
    pub emb: Vec<f32>,
    pub layers: Vec<LayerW>,
    pub final_w: Vec<f32>,
    pub final_b: Vec<f32>,
    pub act: Activation,
    /// The formats the matrices were stored in (and dequantised from).
    pub formats: FormatPlan,
}

fn mlp(cfg: &Config, m: &Mlp, layer: usize, f: &FormatPlan) -> Result<MlpW> {
    let (d, ffn) = (cfg.hidden_size, cfg.ffn_hidden_size);
    let (fc1, fc1_b) = linear(&m.fc1, "fc1", layer)?;
    let (fc2, fc2_b) = linear(&m.fc2, "fc2", layer)?;
    Ok(MlpW {
        fc1: roundtrip(&fc1, cfg.fc1_rows(), d, f.fc1)?,
        fc1_b,
        fc2_t: roundtrip(&transpose(&fc2, d, ffn), ffn, d, f.fc2)?,
        fc2_b,
    })
}

impl HostWeights {
    /// Copies `model`'s weights (any dtype) to f32 host vectors, as they are.
    pub fn from_model(model: &Model) -> Result<Self> {
        Self::from_model_in(model, &FormatPlan::uniform(WeightFormat::F32))
    }

    /// As [`HostWeights::from_model`], each matrix stored in its `formats` entry (in the
    /// kernel's layout) and dequantised: the values a kernel streaming those bytes computes with.
    pub fn from_model_in(model: &Model, formats: &FormatPlan) -> Result<Self> {
        let cfg = &model.cfg;
        let f = formats;
        let (r, xr) = (cfg.dt_rank(), cfg.x_proj_rows());
        let (d, di) = (cfg.hidden_size, cfg.d_inner());
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, b) in model.layers.iter().enumerate() {
            let norm = host(&b.norm)?;
            layers.push(match &b.mixer {
                Mixer::Mamba(m) => {
                    let (in_w, in_b) = linear(&m.in_proj, "in_proj", i)?;
                    let (x_w, _) = linear(&m.x_proj, "x_proj", i)?;
                    let (dt_w, _) = linear(&m.dt_proj, "dt_proj", i)?;
                    let (out_w, out_b) = linear(&m.out_proj, "out_proj", i)?;
                    LayerW::Mamba(MambaW {
                        norm,
                        in_w: roundtrip(&in_w, 2 * di, d, f.in_proj)?,
                        in_b,
                        conv_w: host(&m.conv_w)?,
                        conv_b: host(&m.conv_b)?,
                        x_t: roundtrip(&transpose(&x_w, xr, di), di, xr, f.x_proj)?,
                        dt_w: roundtrip(&dt_w, di, r, f.dt_proj)?,
                        dt_b: host(&m.dt_bias)?,
                        a: host(&m.a_log)?.into_iter().map(|x| -x.exp()).collect(),
                        d_skip: host(&m.d)?,
                        out_t: roundtrip(&transpose(&out_w, d, di), di, d, f.out_proj)?,
                        out_b,
                    })
                }
                Mixer::Moe(m) => {
                    let (router_w, router_b) = linear(&m.router, "router", i)?;
                    LayerW::Moe {
                        norm,
                        router_w,
                        router_b: router_b.ok_or_else(|| Error::Invalid(format!("megakernel: layer {i} router has no bias")))?,
                        experts: m.experts.iter().map(|e| mlp(cfg, e, i, f)).collect::<Result<_>>()?,
                    }
                }
                Mixer::Dense(m) => LayerW::Dense {
                    norm,
                    mlp: mlp(cfg, m, i, f)?,
                },
            });
        }
        Ok(Self {
            emb: roundtrip(&host(&model.embedding)?, cfg.vocab_size, d, f.head)?,
            layers,
            final_w: host(&model.final_w)?,
            final_b: host(&model.final_b)?,
            act: cfg.expert_activation,
            formats: *formats,
        })
    }
}

/// The recurrent state as the kernel holds it: per half-block the conv window (d_inner · K,
/// oldest first) and the SSM state (d_inner · N), both empty for a MoE or dense layer.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub conv: Vec<Vec<f32>>,
    pub ssm: Vec<Vec<f32>>,
}

impl HostState {
    /// The state before any token.
    pub fn zeros(cfg: &Config) -> Self {
        let di = cfg.d_inner();
        let mamba = |i: usize| cfg.layer_kind(i) == crate::model::config::LayerKind::Mamba;
        let sized = |i: usize, n: usize| if mamba(i) { vec![0.0; di * n] } else { Vec::new() };
        Self {
            conv: (0..cfg.num_layers).map(|i| sized(i, cfg.conv_dimension)).collect(),
            ssm: (0..cfg.num_layers).map(|i| sized(i, cfg.state_size)).collect(),
        }
    }

    /// A copy of a batch-1 [`State`] (e.g. after a prefill).
    pub fn from_state(state: &State) -> Result<Self> {
        if state.batch != 1 {
            return Err(Error::Invalid(format!(
                "megakernel: decodes batch 1, the state has batch {}",
                state.batch
            )));
        }
        let mut out = Self {
            conv: Vec::new(),
            ssm: Vec::new(),
        };
        for l in &state.layers {
            out.conv.push(l.as_ref().map(|l| host(&l.conv)).transpose()?.unwrap_or_default());
            out.ssm.push(l.as_ref().map(|l| host(&l.ssm)).transpose()?.unwrap_or_default());
        }
        Ok(out)
    }
}
