//! Training step with activations recomputed layer by layer ("activation checkpointing").
//!
//! Autograd over the whole stack keeps every intermediate of every layer until the backward pass:
//! on BlackMamba-2.8B shapes about 23 MB a token, so 2,048 tokens at batch 1 peaked at 80 GB and
//! batch 4 did not fit an H200. Here only the residual stream between half-blocks is kept
//! (B·L·d f32 per layer boundary):
//!
//! 1. forward, one half-block at a time, each output detached: h₀ = embed(ids), hᵢ₊₁ = blockᵢ(hᵢ);
//! 2. the head and loss on h_N (a variable), backward: the head's gradients and g_N = ∂loss/∂h_N;
//! 3. for i = N−1 … 0: blockᵢ again on hᵢ (a variable), backward of Σ blockᵢ(hᵢ) ⊙ gᵢ₊₁: the
//!    layer's parameter gradients and gᵢ = ∂loss/∂hᵢ (the residual path included, since blockᵢ
//!    returns hᵢ + mixer);
//! 4. the embedding's gradient from Σ embed(ids) ⊙ g₀ when it is trained.
//!
//! Every layer runs forward twice; memory holds one layer's graph at a time. Each MoE layer's
//! routing is decided once, in pass 1 (router logits to the host, Sinkhorn, the grouping by
//! expert), and the recomputed pass reuses that [`Route`]: the same experts as deciding again from
//! the same inputs would give, without the host round trip; the probe records pass 1.
//! The gradients equal those of [`crate::finetune::loss::batch_nll`]'s single backward
//! (`tests/finetune_recompute.rs`). On the GPU the layers of a bf16 model are differentiated
//! without autograd where they can be (`runtime::grad::mamba_block`, `runtime::grad::moe_block`; their
//! time counts as backward).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use std::time::Instant;

use crate::error::Result;
use crate::finetune::data::Batch;
use crate::finetune::loss::nll_sum;
use crate::finetune::FirstPass;
use crate::model::moe::Route;
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::Model;

/// Where a recomputed micro-batch's time went (seconds; filled when profiling, with the device
/// waited for at each boundary).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LayerTiming {
    /// Pass 1: every half-block forward once.
    pub first_pass_s: f64,
    /// The head, the loss and their backward.
    pub head_s: f64,
    /// Pass 2, Mamba half-blocks: recomputed forward, then backward.
    pub mamba_fwd_s: f64,
    pub mamba_bwd_s: f64,
    /// Pass 2, MoE half-blocks: recomputed forward, then backward.
    pub moe_fwd_s: f64,
    pub moe_bwd_s: f64,
    /// The embedding's backward.
    pub embed_s: f64,
}

/// The summed loss of one micro-batch (as [`crate::finetune::loss::batch_nll`]), returned
/// detached, with the gradients of loss / `per` with respect to `vars` added into `grads`
/// (see [`accumulate`]), by layer-wise recomputation.
#[allow(clippy::too_many_arguments)] // the step's inputs and its two outputs, each distinct
pub fn nll_and_grads(
    model: &Model,
    batch: &Batch,
    mut probe: Option<&mut Probe>,
    per: f64,
    vars: &[&Var],
    grads: &mut [Option<Tensor>],
    first_pass: FirstPass,
    mut prof: Option<&mut LayerTiming>,
) -> Result<Tensor> {
    let (bsz, len) = batch.ids.dims2()?;
    // with a profile: wait for the device, add the time since `t` to the field, restart the clock
    let mut t = Instant::now();
    let mut lap = |field: fn(&mut LayerTiming) -> &mut f64| -> Result<()> {
        if let Some(p) = prof.as_deref_mut() {
            model.device.synchronize()?;
            *field(p) += t.elapsed().as_secs_f64();
            t = Instant::now();
        }
        Ok(())
    };
    let n = model.layers.len();

    // 1. forward, keeping the layer boundaries only
    if let Some(p) = probe.as_deref_mut() {
        model.probe_slots(p);
        p.n_tokens += bsz * len;
    }
    let mut hs: Vec<Tensor> = Vec::with_capacity(n + 1);
    let mut routes: Vec<Option<Route>> = vec![None; n]; // each MoE layer's, filled by pass 1
    hs.push(model.embed(&batch.ids)?.to_dtype(DType::F32)?.detach()); // (B, L, d)
    for i in 0..n {
        // a fresh state per layer, dropped with the layer's graph (every sequence starts at zero)
        let mut state = State::for_layer(&model.cfg, bsz, &model.device, i)?;
        let h = first_pass_block(model, first_pass, i, &hs[i], &mut state, probe.as_deref_mut(), &mut routes[i])?;
        hs.push(h.detach());
    }
    lap(|p| &mut p.first_pass_s)?;

    // 2. head and loss
    let top = Var::from_tensor(&hs[n])?;
    let logits = model.head_rows(top.as_tensor(), &batch.rows)?; // (n, V)
    let nll = nll_sum(&logits, &batch.targets, model.fuses_loss(logits.dtype()))?;
    let store = (&nll / per)?.backward()?;
    accumulate(grads, vars, &store)?;
    let mut g = match store.get(top.as_tensor()) {
        Some(g) => g.detach(),
        None => hs[n].zeros_like()?,
    };
    drop((store, logits, top));
    hs.truncate(n);
    lap(|p| &mut p.head_s)?;

    // 3. each half-block again, last to first
    for i in (0..n).rev() {
        let Some(hi) = hs.pop() else { break };
        #[cfg(feature = "cuda")]
        if let Some(bg) = by_hand(model, i, &hi, &g, routes[i].as_ref())? {
            // differentiated without autograd (its forward again included: all backward)
            for (t, grad) in &bg.params {
                accumulate(grads, vars, &t.backward_seeded(grad)?)?; // through the bf16 cast
            }
            g = bg.dh;
            let moe = model.layers[i].is_moe();
            lap(if moe { |p| &mut p.moe_bwd_s } else { |p| &mut p.mamba_bwd_s })?;
            continue;
        }
        let h = Var::from_tensor(&hi)?;
        let mut st = State::for_layer(&model.cfg, bsz, &model.device, i)?;
        let out = model.block(i, h.as_tensor(), &mut st, None, true, routes.get_mut(i))?;
        let moe = model.layers[i].is_moe();
        lap(if moe { |p| &mut p.moe_fwd_s } else { |p| &mut p.mamba_fwd_s })?;
        let store = out.backward_seeded(&g)?; // ∂(Σ out ⊙ g)/∂· without forming the sum
        accumulate(grads, vars, &store)?;
        g = match store.get(h.as_tensor()) {
            Some(x) => x.detach(),
            None => g,
        };
        lap(if moe { |p| &mut p.moe_bwd_s } else { |p| &mut p.mamba_bwd_s })?;
    }

    // 4. the embedding (tied to the head; a variable only when trained)
    #[cfg(feature = "cuda")]
    if model.trains_with_kernels() && (model.embedding.is_variable() || model.embedding.track_op()) {
        // the rows' gradients scattered into the table (ops::rows), then through its cast
        let emb = &model.embedding;
        let g2 = g.flatten_to(1)?.to_dtype(emb.dtype())?; // (B·L, d), rounded as index_select's backward sees it
        let table = crate::ops::rows::scatter_add_rows(&g2, &batch.ids.flatten_all()?, emb.dim(0)?)?; // (V, d) f32
        accumulate(grads, vars, &emb.backward_seeded(&table.to_dtype(emb.dtype())?)?)?;
        lap(|p| &mut p.embed_s)?;
        return Ok(nll.detach());
    }
    let x = model.embed(&batch.ids)?.to_dtype(DType::F32)?;
    if x.is_variable() || x.track_op() {
        let store = x.backward_seeded(&g)?;
        accumulate(grads, vars, &store)?;
    }
    lap(|p| &mut p.embed_s)?;
    Ok(nll.detach())
}

/// Half-block `i`'s gradients without autograd where `runtime::grad::mamba_block` /
/// `runtime::grad::moe_block` take it.
#[cfg(feature = "cuda")]
fn by_hand(
    model: &Model,
    i: usize,
    h: &Tensor,
    g: &Tensor,
    route: Option<&Route>,
) -> Result<Option<crate::runtime::grad::mamba_block::BlockGrads>> {
    match model.layers[i].is_moe() {
        true => crate::runtime::grad::moe_block::half_block_grads(model, i, h, g, route),
        false => crate::runtime::grad::mamba_block::half_block_grads(model, i, h, g),
    }
}

/// Half-block `i` of pass 1: on the fused inference kernels where the model runs them and
/// `first_pass` allows (`runtime::grad::first_pass_block`), else [`Model::block`].
fn first_pass_block(
    model: &Model,
    first_pass: FirstPass,
    i: usize,
    res: &Tensor,
    state: &mut State,
    probe: Option<&mut Probe>,
    route: &mut Option<Route>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if first_pass == FirstPass::Kernels && model.trains_with_kernels() {
        return crate::runtime::grad::first_pass_block(model, i, res, state, probe, route);
    }
    let _ = first_pass;
    model.block(i, res, state, probe, true, Some(route))
}

/// grads\[k\] += the store's gradient of vars\[k\], where it has one (gradient accumulation
/// over layers and micro-batches).
pub fn accumulate(grads: &mut [Option<Tensor>], vars: &[&Var], store: &GradStore) -> Result<()> {
    for (g, v) in grads.iter_mut().zip(vars) {
        if let Some(new) = store.get(v.as_tensor()) {
            *g = Some(match g.take() {
                Some(acc) => (acc + new)?,
                None => new.clone(),
            });
        }
    }
    Ok(())
}
