//! The DPO side of the trainer (`--method dpo…`): the preference data, the reference log-probs
//! and one micro-batch's loss and gradients.
//!
//! Policy and reference score responses with greedy routing (the model as served), so a
//! response's log-prob depends on it alone, not on the batch it is in. With LoRA adapters (and
//! no trained router) the reference is the same model with its adapters off, run on the same
//! batch as the policy: no second copy of the weights, and at step 0 the rewards are exactly 0.
//! With every weight (or the routers) trained, the reference log-probs of every training pair
//! are computed once from the base before training (on resume: again, from the base) and kept,
//! so no second model is held either.

use candle_core::{DType, Tensor, Var};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::finetune::data::{self, Batch, Example};
use crate::finetune::dpo::{batch_logprobs, pair_sides, pref_loss, PrefOut};
use crate::finetune::loss::detached;
use crate::finetune::prefs::{self, PrefPair};
use crate::finetune::recompute::accumulate;
use crate::finetune::{FinetuneConfig, Method};
use crate::model::probe::Probe;
use crate::model::Model;

/// Where the reference log-probs come from.
pub(super) enum Reference {
    /// The model with its LoRA adapters off, on each batch.
    AdapterOff,
    /// (chosen, rejected) of each training pair, computed before training.
    Stored(Vec<[f32; 2]>),
}

/// The preference pairs of a run and their reference.
pub(super) struct PrefRun {
    pub pairs: Vec<PrefPair>,
    pub reference: Reference,
}

/// Reads `cfg.data` (and `cfg.eval_data`) as preference pairs -> (training pairs, the chosen
/// sides of the held-out pairs (the eval loss is theirs), the training file's sha256).
pub(super) fn load(cfg: &FinetuneConfig, tok: &Tokenizer, vocab: usize) -> Result<(Vec<PrefPair>, Vec<Example>, String)> {
    let set = prefs::load(&cfg.data, tok, cfg.seq_len)?;
    check_vocab(&cfg.data, &set.pairs, vocab)?;
    let (train, mut held) = match &cfg.eval_data {
        Some(p) => {
            let ev = prefs::load(p, tok, cfg.seq_len)?;
            check_vocab(p, &ev.pairs, vocab)?;
            (set.pairs, ev.pairs)
        }
        None => data::split(set.pairs, cfg.eval_fraction, cfg.seed),
    };
    if cfg.eval_max > 0 {
        held.truncate(cfg.eval_max);
    }
    Ok((train, held.into_iter().map(|p| p.chosen).collect(), set.hash))
}

fn check_vocab(path: &std::path::Path, pairs: &[PrefPair], vocab: usize) -> Result<()> {
    let ids = pairs.iter().flat_map(|p| p.chosen.ids.iter().chain(&p.rejected.ids));
    match ids.copied().find(|&id| id as usize >= vocab) {
        Some(id) => Err(Error::bad_file(
            path,
            format!("token id {id} is outside the model's vocabulary of {vocab}; use the model's own tokenizer"),
        )),
        None => Ok(()),
    }
}

/// Whether a run's reference is its model with the adapters off (else: stored log-probs).
pub(super) fn reference_is_adapter_off(cfg: &FinetuneConfig) -> bool {
    cfg.method == Method::Lora && !cfg.train_router
}

impl PrefRun {
    /// The run's pairs with their reference; `model` is the run's model before any step (its
    /// fresh adapters add nothing; trained tensors are still the base's).
    pub(super) fn new(model: &Model, cfg: &FinetuneConfig, pairs: Vec<PrefPair>) -> Result<Self> {
        if reference_is_adapter_off(cfg) {
            return Ok(Self {
                pairs,
                reference: Reference::AdapterOff,
            });
        }
        let view = detached(model)?;
        let mut stored = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(cfg.batch.max(1)) {
            let refs: Vec<&PrefPair> = chunk.iter().collect();
            let lp = side_logprobs(&view, &refs, None)?.0.to_vec1::<f32>()?;
            let n = refs.len();
            stored.extend((0..n).map(|i| [lp[i], lp[n + i]]));
        }
        Ok(Self {
            pairs,
            reference: Reference::Stored(stored),
        })
    }
}

/// The summed response log-probs of the chosen then the rejected sides (2B), and the input
/// tokens read.
fn side_logprobs(model: &Model, pairs: &[&PrefPair], probe: Option<&mut Probe>) -> Result<(Tensor, usize)> {
    let sides = pair_sides(pairs);
    let batch = Batch::new(&sides, &model.device)?;
    Ok((batch_logprobs(model, &sides, &batch, probe)?, batch.n_inputs))
}

/// The model with every LoRA adapter off, sharing its tensors (no graph).
fn adapter_off_view(model: &Model) -> Result<Model> {
    let mut m = detached(model)?;
    m.visit_linears_mut(&mut |l| {
        l.lora = None;
        Ok(())
    })?;
    Ok(m)
}

/// What one micro-batch of pairs did.
pub(super) struct Micro {
    /// The sum of the pairs' losses.
    pub loss_sum: f64,
    pub out: PrefOut,
    pub n_inputs: usize,
}

/// One micro-batch of the pairs `idx`: the loss, its gradients added into `grads` (weighted so
/// the step's gradient is that of the mean over its `total_pairs` pairs), the rewards.
#[allow(clippy::too_many_arguments)]
pub(super) fn micro(
    model: &Model,
    run: &PrefRun,
    cfg: &FinetuneConfig,
    idx: &[usize],
    total_pairs: usize,
    vars: &[&Var],
    grads: &mut [Option<Tensor>],
    probe: &mut Probe,
) -> Result<Micro> {
    let pairs: Vec<&PrefPair> = idx.iter().map(|&i| &run.pairs[i]).collect();
    let n = pairs.len();
    let (pi, n_inputs) = side_logprobs(model, &pairs, Some(probe))?;
    let reference = match &run.reference {
        Reference::AdapterOff => side_logprobs(&adapter_off_view(model)?, &pairs, None)?.0,
        Reference::Stored(v) => {
            let r: Vec<f32> = (0..2).flat_map(|side| idx.iter().map(move |&i| v[i][side])).collect();
            Tensor::from_vec(r, 2 * n, &model.device)?
        }
    };
    let (pc, pr) = (pi.narrow(0, 0, n)?, pi.narrow(0, n, n)?);
    let (rc, rr) = (reference.narrow(0, 0, n)?, reference.narrow(0, n, n)?);
    let out = pref_loss(&pc, &pr, &rc, &rr, cfg.dpo_beta, cfg.dpo_loss)?;
    let store = (&out.loss * (n as f64 / total_pairs.max(1) as f64))?.backward()?;
    accumulate(grads, vars, &store)?;
    let loss_sum = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
    Ok(Micro { loss_sum, out, n_inputs })
}
