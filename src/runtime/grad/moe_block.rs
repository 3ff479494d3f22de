//! A MoE half-block's gradients without autograd, for fine-tuning on the GPU (the layer-wise
//! recomputation of `finetune::recompute` calls it once per MoE layer, last to first, with the
//! route pass 1 decided).
//!
//! For h_out = h + σ(r_e*)·expert_e*(xn), xn = RMSNorm(h), r = W_r·xn + b_r (f32) and e* each
//! token's expert, with the gradient g of h_out (n = B·L tokens, grouped by expert as in pass 1):
//!
//! ```text
//! forward again: xn, r, gate = σ(r_e*), per expert a = x_e·W1ᵀ, h = act(a_gate)·a_up, y = h·W2ᵀ
//! dgate = Σ_k g·y                      dy = g·gate (bf16)          (one kernel, moe_train.cu)
//! per expert: dh = dy_e·W2, dW2 = dy_eᵀ·h, da = act'(a, dh), dW1 = daᵀ·x_e, dx_e = da·W1
//! dr = onehot(e*)·dgate·gate·(1 − gate)      dW_r = drᵀ·xn, db_r = Σ dr, dxn += dr·W_r
//! RMSNorm backward: dh_in = g + dx, dnorm_w
//! ```
//!
//! The same roundings as autograd through `SwitchMlp::forward_cached` (its twin): the experts in
//! bf16, the router in f32, the expert and router gradients of xn added in bf16; what goes is
//! autograd's zero-padded gradients of the per-expert slices and of the gather, its broadcast
//! bookkeeping and the graph itself. `tests/moe_block_grad_gpu.rs` compares the two.
//!
//! It applies to bf16 models with gated experts whose projections have neither adapters nor biases
//! and a plain f32 router (full and router-only fine-tuning, and LoRA that leaves the experts
//! alone); anything else, or ``--slow-moe-grad``, takes autograd.
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use super::mamba_block::BlockGrads;
use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::moe::Route;
use crate::model::{Mixer, Model};
use crate::ops::cuda::{cuda_device, dptr, empty, func, Launch, Module};
use crate::ops::gated_act::{gated_act, gated_act_backward};
use crate::ops::params::{to_i32, to_i64, MoeGateBwdParams};
use crate::ops::rms_norm::{rms_norm, rms_norm_backward};

/// The gradients at the gate of out = y·gate (kernels/moe_train.cu): g (n, d) f32, y (n, d) bf16,
/// gate (n, 1) f32 -> (dgate = Σ_k g·y (n, 1) f32, dy = g·gate (n, d) bf16), one pass over g and y.
fn gate_backward(g: &Tensor, y: &Tensor, gate: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, d) = g.dims2()?;
    let dev = g.device();
    let cd = cuda_device(dev)?;
    let (g, y, gate) = (g.contiguous()?, y.contiguous()?, gate.contiguous()?);
    let dgate = empty(&[n, 1], DType::F32, dev)?;
    let dy = empty(&[n, d], DType::BF16, dev)?;
    if g.dtype() != DType::F32
        || y.dtype() != DType::BF16
        || gate.dtype() != DType::F32
        || y.elem_count() != n * d
        || gate.elem_count() != n
    {
        return Err(crate::error::Error::Invalid(format!(
            "MoE gate backward: needs g (n, d) f32, y (n, d) bf16, gate (n, 1) f32; got {:?} {:?}, {:?} {:?}, {:?} {:?}",
            g.dims(),
            g.dtype(),
            y.dims(),
            y.dtype(),
            gate.dims(),
            gate.dtype()
        )));
    }
    let params = MoeGateBwdParams {
        g: dptr(&g)?,
        y: dptr(&y)?,
        gate: dptr(&gate)?,
        dgate: dptr(&dgate)?,
        dy: dptr(&dy)?,
        n: to_i64(n, "MoE gate backward: rows")?,
        d: to_i32(d, "MoE gate backward: width")?,
    };
    // SAFETY: g (n, d) f32, y (n, d) bf16, gate (n) f32 (checked above), dgate (n) f32 and dy
    // (n, d) bf16 are the contiguous tensors above, held until this function returns (candle's
    // stream orders their release after the launch).
    unsafe {
        Launch::new(
            func(cd, Module::MoeTrain, "moe_gate_bwd_bf16")?,
            (n.clamp(1, 65535) as u32, 1, 1),
            256,
            0,
        )
        .params(params)
        .label("moe-gate-bwd")
        .run(&cd.cuda_stream())
    }?;
    Ok((dgate, dy))
}

fn trained(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

fn plain(l: &Linear, dtype: DType) -> bool {
    l.lora.is_none() && l.bias.is_none() && l.weight.dtype() == dtype
}

/// The gradients of half-block `i` (a MoE layer) at input `h` (B, L, d) f32 for the output
/// gradient `g` (B, L, d) f32 with pass 1's `route`; `None` when the block is not one this path
/// takes (see the module doc), to be differentiated by autograd.
pub fn half_block_grads(model: &Model, i: usize, h: &Tensor, g: &Tensor, route: Option<&Route>) -> Result<Option<BlockGrads>> {
    let blk = model.layer(i)?;
    let (Mixer::Moe(m), Some(route)) = (&blk.mixer, route) else {
        return Ok(None);
    };
    let Some((group, counts)) = route.grouping() else { return Ok(None) };
    let bf = DType::BF16;
    let k = model.kernels;
    let fits = model.trains_with_kernels()
        && k.moe_grad
        && k.rms_norm
        && h.dtype() == DType::F32
        && m.router.lora.is_none()
        && m.router.weight.dtype() == DType::F32
        && m.router.bias.as_ref().is_some_and(|b| b.dtype() == DType::F32)
        && m.experts.iter().all(|e| e.gated && plain(&e.fc1, bf) && plain(&e.fc2, bf))
        && counts.len() == m.experts.len();
    if !fits {
        return Ok(None);
    }
    let (bn, len, d) = h.dims3()?;
    let n = bn * len;
    let dev = h.device();
    let eps = model.cfg.layernorm_epsilon;
    let (hd, wn) = (h.detach().reshape((n, d))?.contiguous()?, blk.norm.detach()); // (n, d) f32, (d)
    let w_r = m.router.weight.detach(); // (E, d) f32
    let b_r = m.router.bias.as_ref().map(|b| b.detach()); // (E) f32

    // forward, as far as the backward needs it
    let xn = rms_norm(&hd, &wn, eps, bf)?; // (n, d) bf16
    let xn32 = xn.to_dtype(DType::F32)?; // (n, d): the router's input
    let mut logits = xn32.matmul(&w_r.t()?)?; // (n, E)
    if let Some(b) = &b_r {
        logits = logits.broadcast_add(b)?;
    }
    let gate = candle_nn::ops::sigmoid(&logits)?.gather(route.idx(), 1)?; // (n, 1) σ(r_e*)
    let sorted = group.apply(&xn)?; // (n, d) grouped by expert
    let mut acts = Vec::with_capacity(counts.len()); // per expert with tokens: (offset, a, h)
    let mut outs = Vec::with_capacity(counts.len());
    let mut off = 0;
    for (e, &c) in counts.iter().enumerate() {
        if c > 0 {
            let x = sorted.narrow(0, off, c)?; // (c, d)
            let a = x.matmul(&m.experts[e].fc1.weight.detach().t()?)?; // (c, 2F)
            let hh = gated_act(&a, m.experts[e].act)?; // (c, F)
            outs.push(hh.matmul(&m.experts[e].fc2.weight.detach().t()?)?); // (c, d)
            acts.push((e, off, a, hh));
            off += c;
        }
    }
    let y = group.inverse().apply(&Tensor::cat(&outs, 0)?)?; // (n, d) bf16, token order

    // backward
    let (dgate, dy) = gate_backward(&g.reshape((n, d))?, &y, &gate)?; // (n, 1), (n, d) bf16
    let dys = group.apply(&dy)?; // (n, d) bf16, grouped
    let mut dxs = Vec::with_capacity(acts.len());
    let mut params = Vec::new();
    for (e, off, a, hh) in &acts {
        let (ex, c) = (&m.experts[*e], a.dim(0)?);
        let dy = dys.narrow(0, *off, c)?; // (c, d)
        let w1 = ex.fc1.weight.detach(); // (2F, d)
        let dh = dy.matmul(&ex.fc2.weight.detach())?; // (c, F)
        if trained(&ex.fc2.weight) {
            params.push((ex.fc2.weight.clone(), dy.t()?.matmul(hh)?)); // (d, F)
        }
        let da = gated_act_backward(a, ex.act, &dh)?; // (c, 2F)
        if trained(&ex.fc1.weight) {
            params.push((ex.fc1.weight.clone(), da.t()?.matmul(&sorted.narrow(0, *off, c)?)?));
            // (2F, d)
        }
        dxs.push(da.matmul(&w1)?); // (c, d)
    }
    let dxn_experts = group.inverse().apply(&Tensor::cat(&dxs, 0)?)?; // (n, d) bf16, token order
                                                                      // the router, through the gate only: dr = onehot(e*)·dgate·σ'(r_e*)
    let e_count = w_r.dim(0)?;
    let experts = Tensor::arange(0u32, e_count as u32, dev)?.unsqueeze(0)?; // (1, E)
    let onehot = route.idx().broadcast_eq(&experts)?.to_dtype(DType::F32)?; // (n, E)
    let dsig = (&dgate * (&gate * gate.affine(-1.0, 1.0)?)?)?; // (n, 1)
    let dr = onehot.broadcast_mul(&dsig)?; // (n, E)
    let dxn = (dxn_experts + dr.matmul(&w_r)?.to_dtype(bf)?)?; // (n, d) bf16
    if trained(&m.router.weight) {
        params.push((m.router.weight.clone(), dr.t()?.matmul(&xn32)?)); // (E, d)
    }
    if let Some(b) = m.router.bias.as_ref().filter(|b| trained(b)) {
        params.push((b.clone(), dr.sum(0)?)); // (E)
    }
    let (dx, dnorm) = rms_norm_backward(&hd, &wn, eps, bf, &dxn, trained(&blk.norm))?;
    if let Some(dw) = dnorm {
        params.push((blk.norm.clone(), dw));
    }
    let dh = (g + dx.reshape((bn, len, d))?)?;
    Ok(Some(BlockGrads { dh, params }))
}
