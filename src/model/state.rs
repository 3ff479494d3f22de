//! The recurrent state of the model (SPEC §5 "States per Mamba layer"): per Mamba half-block the
//! last `conv_dimension` raw inputs u of the depthwise conv (oldest first) and the SSM state h, both
//! f32 whatever the model dtype. Tensors are immutable, so a clone is a cheap snapshot.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Config, LayerKind};

/// The state of one Mamba layer.
#[derive(Debug, Clone)]
pub struct LayerState {
    /// (B, d_inner, K): u_{t−K+1..t}, oldest at index 0
    pub conv: Tensor,
    /// (B, d_inner, N): h_t
    pub ssm: Tensor,
}

/// The whole model's recurrent state: one entry per half-block (None for MoE / dense ones).
#[derive(Debug, Clone)]
pub struct State {
    pub layers: Vec<Option<LayerState>>,
    /// Tokens consumed so far.
    pub pos: usize,
    pub batch: usize,
}

impl State {
    /// A zero state (the state before any token) for `batch` sequences.
    pub fn new(cfg: &Config, batch: usize, device: &Device) -> Result<Self> {
        let di = cfg.d_inner();
        let layers = (0..cfg.num_layers)
            .map(|i| match cfg.layer_kind(i) {
                LayerKind::Mamba => Ok(Some(LayerState {
                    conv: Tensor::zeros((batch, di, cfg.conv_dimension), DType::F32, device)?,
                    ssm: Tensor::zeros((batch, di, cfg.state_size), DType::F32, device)?,
                })),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, pos: 0, batch })
    }

    /// A zero state for half-block `i` alone (every other layer None): what the layer-wise
    /// recomputation of fine-tuning runs one half-block on, without a zero fill per Mamba layer
    /// of the model for each.
    pub fn for_layer(cfg: &Config, batch: usize, device: &Device, i: usize) -> Result<Self> {
        let di = cfg.d_inner();
        let mut layers: Vec<Option<LayerState>> = (0..cfg.num_layers).map(|_| None).collect();
        if let (Some(slot), LayerKind::Mamba) = (layers.get_mut(i), cfg.layer_kind(i)) {
            *slot = Some(LayerState {
                conv: Tensor::zeros((batch, di, cfg.conv_dimension), DType::F32, device)?,
                ssm: Tensor::zeros((batch, di, cfg.state_size), DType::F32, device)?,
            });
        }
        Ok(Self { layers, pos: 0, batch })
    }

    /// Flattens to host vectors per Mamba layer (conv then ssm), for saving a snapshot.
    pub fn to_host(&self) -> Result<StateSnapshot> {
        let mut layers = Vec::new();
        for l in self.layers.iter().flatten() {
            layers.push((l.conv.flatten_all()?.to_vec1::<f32>()?, l.ssm.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(StateSnapshot {
            pos: self.pos,
            batch: self.batch,
            layers,
        })
    }

    /// Rebuilds a state from a host snapshot, checking it fits `cfg`.
    pub fn from_host(cfg: &Config, snap: &StateSnapshot, device: &Device) -> Result<Self> {
        let mut st = Self::new(cfg, snap.batch, device)?;
        let mut it = snap.layers.iter();
        for l in st.layers.iter_mut().flatten() {
            let (conv, ssm) = it
                .next()
                .ok_or_else(|| Error::Invalid("state snapshot has fewer layers than the model".into()))?;
            if conv.len() != l.conv.elem_count() || ssm.len() != l.ssm.elem_count() {
                return Err(Error::Invalid("state snapshot does not match the model's sizes".into()));
            }
            l.conv = Tensor::from_slice(conv, l.conv.dims(), device)?;
            l.ssm = Tensor::from_slice(ssm, l.ssm.dims(), device)?;
        }
        if it.next().is_some() {
            return Err(Error::Invalid("state snapshot has more layers than the model".into()));
        }
        st.pos = snap.pos;
        Ok(st)
    }
}

/// A host copy of a [`State`]: `(conv, ssm)` per Mamba layer, row-major.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateSnapshot {
    pub pos: usize,
    pub batch: usize,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}
