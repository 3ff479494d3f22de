//! Pass 1 of the recomputed training step (`finetune::recompute`) on the inference kernels.
//!
//! Pass 1 only has to produce each half-block's output (the next layer boundary, kept detached)
//! and each MoE layer's routing decision; nothing of it is differentiated, since every layer runs
//! again under autograd in pass 2. So it can take the fused forward of inference (fused add +
//! RMSNorm, conv and scan kernels, the batched experts) instead of the differentiable tensor ops,
//! with one difference: the experts are chosen by the model's routing (Sinkhorn over the
//! micro-batch) from the router kernel's logits, and that decision is kept for pass 2.
//!
//! Twin: [`Model::block`] (the differentiable path, which pass 1 takes on the CPU, for shapes
//! past the kernels, and with `--first-pass ops`); `tests/first_pass_gpu.rs` compares them.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::fused::mamba::mamba_fusable;
use crate::model::fused::{add_rmsnorm, mamba_forward, moe};
use crate::model::moe::Route;
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::{Mixer, Model};

/// Half-block `i` without autograd: res (B, L, d) f32 -> res + mixer(rmsnorm(res)) f32, the MoE
/// layer's routing decided into `route` (recorded into `probe` as [`Model::block`] records it).
/// Falls back to [`Model::block`] for a Mamba mixer past the kernels.
pub fn first_pass_block(
    model: &Model,
    i: usize,
    res: &Tensor,
    state: &mut State,
    probe: Option<&mut Probe>,
    route: &mut Option<Route>,
) -> Result<Tensor> {
    let block = model.layer(i)?;
    if let Mixer::Mamba(m) = &block.mixer {
        if !mamba_fusable(m, true) {
            return model.block(i, res, state, probe, true, Some(route));
        }
    }
    let res = res.detach();
    let (res, normed) = add_rmsnorm(&res, None, &block.norm.detach(), model.cfg.layernorm_epsilon, model.dtype)?; // f32, (B, L, d) T
    let out = match &block.mixer {
        Mixer::Mamba(m) => {
            let st = state.layers[i]
                .as_mut()
                .ok_or_else(|| Error::Invalid(format!("state has no entry for Mamba layer {i}")))?;
            mamba_forward(m, &normed, st, None)?
        }
        Mixer::Moe(m) => {
            let rec = probe.map(|p| &mut p.moe[model.probe_slot(i, true)]);
            moe::moe_forward_decide(m, &normed, model.routing, rec, route, model.kernels)?
        }
        Mixer::Dense(m) => m.forward(&normed)?,
    };
    Ok((res + out.to_dtype(DType::F32)?)?.detach())
}
