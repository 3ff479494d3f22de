//! The training loss (cross-entropy on the learned positions only) and evaluation.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::finetune::data::{Batch, Example};
use crate::model::moe::Routing;
use crate::model::probe::Probe;
use crate::model::Model;

/// Sum over rows of −log softmax(logits)\[target\]: logits (n, V), targets (n) u32 -> f32 scalar.
/// The fused [`CrossEntropy`] op on the CPU (f32 logits); on the GPU, with `fused` (the model's
/// choice, [`Model::fuses_loss`]), the CUDA op of `ops::xent` (f32, bf16 or f16 logits); its
/// tensor-op twin [`nll_sum_slow`] elsewhere.
pub fn nll_sum(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return Ok(logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)?.sum_all()?);
    }
    #[cfg(feature = "cuda")]
    if fused && logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Ok(crate::ops::xent::cross_entropy(logits, targets)?.sum_all()?);
    }
    let _ = fused;
    nll_sum_slow(logits, targets)
}

/// [`nll_sum`] per row, not summed: (n, V) logits, (n) targets -> (n), differentiable, by the
/// same fused ops where they apply (the per-sequence sums of DPO).
pub fn nll_rows(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return Ok(logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)?);
    }
    #[cfg(feature = "cuda")]
    if fused && logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Ok(crate::ops::xent::cross_entropy(logits, targets)?);
    }
    let _ = fused;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?; // (n, V)
    Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

/// [`nll_sum`] from tensor ops (log-softmax, gather): any device and dtype.
pub fn nll_sum_slow(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?; // (n, V)
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?; // (n, 1)
    Ok(picked.sum_all()?.neg()?)
}

/// Fused cross-entropy: (n, V) f32 logits and (n) u32 targets -> (n) f32 with
/// logsumexp(row) − row\[target\], in one pass per row and without the (n, V) log-softmax the
/// tensor-op form keeps for its backward. Backward: (softmax − onehot) · grad.
pub struct CrossEntropy;

impl candle_core::CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: inputs must be contiguous")
        };
        let logits = &s1.as_slice::<f32>()?[a0..a1];
        let targets = &s2.as_slice::<u32>()?[b0..b1];
        if targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len())
        }
        let mut out = Vec::with_capacity(n);
        for (row, &t) in logits.chunks_exact(v).zip(targets) {
            let Some(&picked) = row.get(t as usize) else {
                candle_core::bail!("cross-entropy: target {t} outside {v} classes")
            };
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            out.push(max + sum.ln() - picked);
        }
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.unsqueeze(1)?; // (n, 1)
        let sm = candle_nn::ops::softmax_last_dim(logits)?.broadcast_mul(&g)?; // (n, V)
        let d = sm.scatter_add(&targets.unsqueeze(1)?, &g.neg()?, 1)?; // − grad at each target
        Ok((Some(d), None))
    }
}

/// The summed loss of one micro-batch and its probe (MoE routing only): a fresh state per batch.
pub fn batch_nll(model: &Model, batch: &Batch, probe: Option<&mut Probe>) -> Result<Tensor> {
    let mut state = model.new_state(batch.ids.dim(0)?)?;
    let logits = model.forward_rows(&batch.ids, &mut state, &batch.rows, probe)?; // (n, V)
    nll_sum(&logits, &batch.targets, model.fuses_loss(logits.dtype()))
}

/// Held-out loss of a model over examples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy per target token (nats).
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Evaluates `model` (as given: routing, dtype) on `examples` in batches of `batch`. The weights
/// are used detached, so no graph is built.
pub fn evaluate(model: &Model, examples: &[Example], batch: usize) -> Result<EvalResult> {
    let mut m = detached(model)?;
    m.differentiable = false;
    let mut total = 0f64;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = Batch::new(&refs, &m.device)?;
        if b.n_targets == 0 {
            continue;
        }
        let nll = batch_nll(&m, &b, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += nll;
        tokens += b.n_targets;
    }
    let loss = if tokens > 0 { total / tokens as f64 } else { f64::NAN };
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

/// A copy of the model whose tensors share storage but carry no graph (cheap).
pub fn detached(model: &Model) -> Result<Model> {
    let mut m = model.clone();
    m.visit_mut(&mut |_, t| {
        *t = t.detach();
        Ok(())
    })?;
    Ok(m)
}

/// The model as served: greedy routing, fused norms.
pub fn inference_view(model: &Model) -> Result<Model> {
    let mut m = detached(model)?;
    m.routing = Routing::Greedy;
    m.differentiable = false;
    Ok(m)
}
