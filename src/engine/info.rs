//! The facts about a loaded model that the UI shows ([`ModelInfo`]), for either family.

use super::finetune;
use super::protocol::ModelInfo;
use crate::lm::{AnyLoaded, AnyModel};
use crate::loader::Loaded;
use crate::model::Model;
use crate::moe_lm::MoeLm;

/// [`model_info`] for either family.
pub fn model_info_any(l: &AnyLoaded) -> ModelInfo {
    match &l.model {
        AnyModel::BlackMamba(m) => mamba_info(m, &l.label, l.untrained, l.load_secs, &l.notes),
        AnyModel::Transformer(m) => transformer_info(l, m),
    }
}

/// The facts about a loaded BlackMamba that the UI shows.
pub fn model_info(l: &Loaded) -> ModelInfo {
    mamba_info(&l.model, &l.label, l.untrained, l.load_secs, &l.notes)
}

fn mamba_info(m: &Model, label: &str, untrained: bool, load_secs: f64, notes: &[String]) -> ModelInfo {
    let cfg = &m.cfg;
    let (total, active) = cfg.param_counts();
    let (is_gpu, dtype) = (m.device.is_cuda(), m.dtype);
    ModelInfo {
        label: label.to_string(),
        untrained,
        device: if is_gpu { "cuda".into() } else { "cpu".into() },
        is_gpu,
        dtype: format!("{dtype:?}").to_lowercase(),
        n_layers: cfg.num_layers,
        moe_layers: cfg.moe_layers(),
        mamba_layers: cfg.mamba_layers(),
        d_model: cfg.hidden_size,
        d_state: cfg.state_size,
        vocab: cfg.vocab_size,
        params_total: total,
        params_active: active,
        bytes_per_token: packed_decode_bytes(m).unwrap_or(active as f64 * dtype.size_in_bytes() as f64),
        load_secs,
        finetune_available: finetune::AVAILABLE,
        quant: None,
        notes: notes.to_vec(),
    }
}

/// Bytes per token the GPU decoder reads for a quantised model (its packed codes and scales, see
/// `runtime::decode`), where the decoder runs it; `None` elsewhere (then: the active parameters
/// at the model's dtype).
fn packed_decode_bytes(m: &Model) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        use crate::runtime::decode::Decoder;
        let packed = Decoder::bytes_per_token(m);
        if m.runs_kernels() && m.kernels.decoder && Decoder::supports(m).is_ok() && packed != Decoder::dense_bytes_per_token(m) {
            return Some(packed as f64);
        }
    }
    let _ = m;
    None
}

/// The facts the UI shows about a transformer: every layer is an MoE layer, none a Mamba layer.
fn transformer_info(l: &AnyLoaded, m: &MoeLm) -> ModelInfo {
    let c = m.config();
    let (h, v, i, e, k) = (
        c.hidden_size,
        c.vocab_size,
        c.intermediate_size,
        c.num_experts,
        c.num_experts_per_tok,
    );
    let attn = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + c.num_attention_heads * c.head_dim * h;
    let per_layer = |experts: usize| attn + h * e + experts * 3 * h * i;
    let heads = 2 * v * h;
    let total = heads + c.num_hidden_layers * per_layer(e);
    let active = heads + c.num_hidden_layers * per_layer(k);
    let (is_gpu, dtype) = (m.device().is_cuda(), m.dtype());
    ModelInfo {
        label: l.label.clone(),
        untrained: l.untrained,
        device: if is_gpu { "cuda".into() } else { "cpu".into() },
        is_gpu,
        dtype: format!("{dtype:?}").to_lowercase(),
        n_layers: c.num_hidden_layers,
        moe_layers: (0..c.num_hidden_layers).map(|l| (l, e)).collect(),
        mamba_layers: Vec::new(),
        d_model: h,
        d_state: 0,
        vocab: v,
        params_total: total,
        params_active: active,
        bytes_per_token: active as f64 * dtype.size_in_bytes() as f64,
        load_secs: l.load_secs,
        finetune_available: false,
        quant: None,
        notes: l.notes.clone(),
    }
}
