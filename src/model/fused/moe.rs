//! The fused SwitchMLP: router + top-1 and token grouping on the device, the experts' products as
//! two batched cuBLAS calls (`moe_batched`; else one product pair per expert with tokens), the
//! gated activation and the scatter back by kernels. Twin: `SwitchMlp::forward`.

use candle_core::{DType, Tensor};

use super::{launch_cap, THREADS};
use crate::error::{Error, Result};
use crate::model::kernels::Kernels;
use crate::model::moe::{Route, Routing, SwitchMlp};
use crate::model::probe::MoeRecord;
use crate::ops::cuda::{blocks_for, cuda_device, dptr, empty, func, suffix, Launch, Module};
use crate::ops::gated_act::gated_act_inference;
use crate::ops::params::{to_i32, MoeGroupParams, MoeUnpermuteParams, RouterTop1Params};
use crate::ops::prof::{self, lap};

/// Fused SwitchMLP (greedy routing): router + sigmoid + top-1 and the token grouping on device,
/// the experts' products batched (or one cuBLAS product pair per expert that has tokens).
/// x (.., d) -> (.., d) f32.
/// `k` says whether the experts' products are batched. Twin: [`SwitchMlp::forward`] (also
/// used here for Sinkhorn routing).
pub fn moe_forward(m: &SwitchMlp, x: &Tensor, routing: Routing, probe: Option<&mut MoeRecord>, k: Kernels) -> Result<Tensor> {
    if routing != Routing::Greedy || !moe_fusable(m) {
        return m.forward(x, routing, probe);
    }
    moe_run(m, x, None, probe, k)
}

/// [`moe_forward`] for fine-tuning's first pass (`finetune::recompute`, no autograd): the
/// experts are chosen by `routing` (Sinkhorn over all tokens of the call) from the router
/// kernel's logits, and that [`Route`] is left in `slot` for the recomputed pass; the gate is
/// σ(logit) of the chosen expert. Twin: [`SwitchMlp::forward_cached`] with an empty slot.
pub fn moe_forward_decide(
    m: &SwitchMlp,
    x: &Tensor,
    routing: Routing,
    probe: Option<&mut MoeRecord>,
    slot: &mut Option<Route>,
    k: Kernels,
) -> Result<Tensor> {
    if !moe_fusable(m) {
        return m.forward_cached(x, routing, probe, Some(slot), true);
    }
    moe_run(m, x, Some((routing, slot)), probe, k)
}

/// Whether the kernels take this layer: a router without adapter, at most 16 experts, a kernel
/// dtype.
fn moe_fusable(m: &SwitchMlp) -> bool {
    m.experts
        .first()
        .is_some_and(|e| m.router.lora.is_none() && m.experts.len() <= 16 && suffix(e.fc1.weight.dtype()).is_ok())
}

/// The fused layer; with `decide`, the routing is decided from the logits into the slot instead
/// of greedy.
fn moe_run(
    m: &SwitchMlp,
    x: &Tensor,
    decide: Option<(Routing, &mut Option<Route>)>,
    mut probe: Option<&mut MoeRecord>,
    k: Kernels,
) -> Result<Tensor> {
    let wdt = m.experts.first().map_or(x.dtype(), |e| e.fc1.weight.dtype());
    let dims = x.dims().to_vec();
    let d = *dims.last().ok_or_else(|| Error::Invalid("moe: scalar input".into()))?;
    let dev = x.device();
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    let cap = launch_cap(dev)?;
    let sfx = suffix(wdt)?;
    let mut laps = prof::start(dev)?;
    let xs = x.reshape(((), d))?.to_dtype(wdt)?.contiguous()?; // (T, d)
    let n_tok = xs.dim(0)?;
    let n_exp = m.experts.len();
    let logits = empty(&[n_tok, n_exp], DType::F32, dev)?;
    let expert = empty(&[n_tok], DType::U32, dev)?;
    let gate = empty(&[n_tok], DType::F32, dev)?;
    let bias = m
        .router
        .bias
        .as_ref()
        .ok_or_else(|| Error::Invalid("moe: router has no bias".into()))?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let wr = m.router.weight.to_dtype(DType::F32)?.contiguous()?; // (E, d)
                                                                  // the router weights in each block's shared memory when they fit the default 48 KB
    let w_bytes = n_exp * d * 4;
    let in_smem = w_bytes <= 48 * 1024;
    let (tn, di, ne) = (
        to_i32(n_tok, "moe: tokens")?,
        to_i32(d, "moe: width")?,
        to_i32(n_exp, "moe: experts")?,
    );
    let params = RouterTop1Params {
        x: dptr(&xs)?,
        Wr: dptr(&wr)?,
        br: dptr(&bias)?,
        logits: dptr(&logits)?,
        expert: dptr(&expert)?,
        gate: dptr(&gate)?,
        Tn: tn,
        d: di,
        E: ne,
        in_smem: i32::from(in_smem),
    };
    // SAFETY: xs (T, d) in the model dtype, wr (E, d) and bias (E) f32, logits (T, E) f32,
    // expert (T) u32 (read as int) and gate (T) f32 are contiguous tensors bound in this function
    // until it returns.
    unsafe {
        Launch::new(
            func(cd, Module::Prefill, &format!("router_top1_{sfx}"))?,
            (blocks_for(n_tok, THREADS / 32, cap), 1, 1),
            THREADS,
            if in_smem { w_bytes as u32 } else { 0 },
        )
        .params(params)
        .run(&stream)
    }?;
    lap(&mut laps, "moe.router")?;
    let route: Option<&Route> = match decide {
        None => None,
        Some((routing, slot)) => Some(&*slot.insert(Route::decide(&logits, n_tok, n_exp, routing, probe.take(), true)?)),
    };
    let decided = route.is_some();
    let (expert, gate) = match route {
        None => (expert, gate),
        Some(r) => {
            laps = prof::start(dev)?; // Route::decide timed its own parts
            let gate = candle_nn::ops::sigmoid(&logits)?.gather(r.idx(), 1)?; // (T, 1)
            (r.idx().flatten_all()?.contiguous()?, gate.flatten_all()?.contiguous()?)
        }
    };
    // the grouping by expert: the decided route's (built on the host), else by the kernel
    let (order, inverse, counts) = match route.and_then(Route::grouping) {
        Some((perm, counts)) => {
            let (order, inverse) = perm.indices();
            (order.clone(), inverse.clone(), counts.iter().map(|&c| c as u32).collect())
        }
        None => {
            let order = empty(&[n_tok], DType::U32, dev)?;
            let inverse = empty(&[n_tok], DType::U32, dev)?;
            let counts = empty(&[n_exp], DType::U32, dev)?;
            let nt: u32 = if n_exp <= 8 { 1024 } else { 512 };
            let params = MoeGroupParams {
                expert: dptr(&expert)?,
                order: dptr(&order)?,
                inverse: dptr(&inverse)?,
                counts: dptr(&counts)?,
                Tn: tn,
                E: ne,
            };
            // SAFETY: expert, order and inverse (T) and counts (E) are contiguous u32 tensors
            // (read as int) bound here until the counts are read back below.
            unsafe {
                Launch::new(func(cd, Module::Prefill, "moe_group")?, (1, 1, 1), nt, nt * n_exp as u32 * 4)
                    .params(params)
                    .run(&stream)
            }?;
            let counts: Vec<u32> = counts.to_vec1()?; // the one host sync: sizes of the expert products
            (order, inverse, counts)
        }
    };
    lap(&mut laps, "moe.group+sync")?;
    let batched = match k.batched_experts {
        true => super::moe_batched::experts_batched(m, &xs, &expert, &inverse, &counts)?,
        false => None,
    };
    let (ys, rows_of) = match batched {
        Some((ys, padpos)) => (ys, padpos),                          // (E·R, d) padded, token -> row
        None => (experts_looped(m, &xs, &order, &counts)?, inverse), // (T, d) grouped
    };
    lap(&mut laps, "moe.experts")?;
    let y = empty(&[n_tok, d], DType::F32, dev)?;
    let params = MoeUnpermuteParams {
        ys: dptr(&ys)?,
        inverse: dptr(&rows_of)?,
        gate: dptr(&gate)?,
        y: dptr(&y)?,
        Tn: tn,
        d: di,
    };
    // SAFETY: ys (rows, d) in the model dtype, rows_of (T) u32 (read as int; each < rows),
    // gate (T) f32 and y (T, d) f32 are contiguous tensors bound in this function until it
    // returns.
    unsafe {
        Launch::new(
            func(cd, Module::Prefill, &format!("moe_unpermute_{sfx}"))?,
            (d.div_ceil(THREADS as usize) as u32, n_tok.min(65535) as u32, 1),
            THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    lap(&mut laps, "moe.unpermute")?;
    if let Some(p) = probe.filter(|_| !decided) {
        p.n_experts = n_exp;
        p.logits.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        p.experts.extend(expert.to_vec1::<u32>()?);
    }
    Ok(y.reshape(dims)?)
}

/// The experts one after another, each on its group of tokens: xs (T, d) token order -> (T, d)
/// in the grouped order of `order`.
fn experts_looped(m: &SwitchMlp, xs: &Tensor, order: &Tensor, counts: &[u32]) -> Result<Tensor> {
    let wdt = xs.dtype();
    let sorted = xs.index_select(order, 0)?; // (T, d) grouped by expert
    let mut outs = Vec::with_capacity(counts.len());
    let mut off = 0;
    for (e, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if c > 0 {
            outs.push(expert_forward(&m.experts[e], &sorted.narrow(0, off, c)?)?.to_dtype(wdt)?); // (c, d)
            off += c;
        }
    }
    Ok(Tensor::cat(&outs, 0)?.contiguous()?)
}

/// One expert on its tokens: fc1 and fc2 on cuBLAS, the gated activation by one kernel.
/// x (n, d) -> (n, d). Twin: [`crate::model::moe::Mlp::forward`] (also used for adapters,
/// biases and ungated experts).
fn expert_forward(e: &crate::model::moe::Mlp, x: &Tensor) -> Result<Tensor> {
    let plain = |l: &crate::model::linear::Linear| l.lora.is_none() && l.bias.is_none();
    if !e.gated || !plain(&e.fc1) || !plain(&e.fc2) {
        return e.forward(x);
    }
    let h = gated_act_inference(&e.fc1.forward(x)?, e.act)?; // (n, f)
    e.fc2.forward(&h)
}
