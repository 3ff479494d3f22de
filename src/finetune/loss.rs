//! The training loss (cross-entropy on the learned positions only) and evaluation.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::finetune::data::{Batch, Example};
use crate::model::moe::Routing;
use crate::model::probe::Probe;
use crate::model::Model;

/// Sum over rows of −log softmax(logits)[target]: logits (n, V) f32, targets (n) u32 -> scalar.
pub fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?; // (n, V)
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?; // (n, 1)
    Ok(picked.sum_all()?.neg()?)
}

/// The summed loss of one micro-batch and its probe (MoE routing only): a fresh state per batch.
pub fn batch_nll(model: &Model, batch: &Batch, probe: Option<&mut Probe>) -> Result<Tensor> {
    let mut state = model.new_state(batch.ids.dim(0)?)?;
    let logits = model.forward_rows(&batch.ids, &mut state, &batch.rows, probe)?; // (n, V)
    nll_sum(&logits, &batch.targets)
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
