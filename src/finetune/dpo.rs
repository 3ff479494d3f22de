//! Direct preference optimisation (Rafailov et al., "Direct Preference Optimization: Your
//! Language Model is Secretly a Reward Model", arXiv 2305.18290) and IPO (Azar et al., arXiv
//! 2310.12036): the losses over summed response log-probabilities, as in the DPO paper.
//!
//! With `h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))`:
//! sigmoid (DPO) `−log σ(β·h)`, IPO `(h − 1/(2β))²`, each the mean over the pairs. The reference
//! log-probs are constants (computed once before training, or with the adapter off).

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::finetune::data::{Batch, Example};
use crate::finetune::loss::nll_rows;
use crate::finetune::prefs::PrefPair;
use crate::model::probe::Probe;
use crate::model::{Logits, Model};

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefLoss {
    /// DPO: −log σ(β·h).
    Sigmoid,
    /// IPO: (h − 1/(2β))².
    Ipo,
}

impl PrefLoss {
    /// The `--dpo-loss` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Ipo => "ipo",
        }
    }

    /// Parses `--dpo-loss`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sigmoid" | "dpo" => Ok(Self::Sigmoid),
            "ipo" => Ok(Self::Ipo),
            other => Err(Error::Invalid(format!("--dpo-loss {other}: use sigmoid (DPO) or ipo"))),
        }
    }
}

/// Summed log-probs of the marked tokens of each sequence: ids (B, L) u32, mask (B, L) f32 with 1
/// where token t (t ≥ 1) belongs to the response -> (B) f32, differentiable through `model`.
pub fn sequence_logprobs(model: &Model, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (bsz, len) = ids.dims2()?;
    if len < 2 {
        return Err(Error::Invalid(
            "a preference sequence needs a prompt token and a response token".into(),
        ));
    }
    let mut state = model.new_state(bsz)?;
    let logits = model.forward(&ids.narrow(1, 0, len - 1)?, &mut state, Logits::All, None)?; // (B, L-1, V)
    let targets = ids.narrow(1, 1, len - 1)?.contiguous()?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?
        .gather(&targets.unsqueeze(2)?, 2)?
        .squeeze(2)?; // (B, L-1)
    Ok((logp * mask.narrow(1, 1, len - 1)?)?.sum(1)?)
}

/// The loss of a batch of pairs and what the fine-tune panel shows of it.
#[derive(Debug, Clone)]
pub struct PrefOut {
    /// Scalar, differentiable.
    pub loss: Tensor,
    /// Mean β·(log π − log π_ref) of the chosen responses.
    pub reward_chosen: f64,
    /// The same of the rejected responses.
    pub reward_rejected: f64,
    /// Mean of chosen − rejected rewards.
    pub margin: f64,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub accuracy: f64,
    /// Pairs in the batch.
    pub n: usize,
    /// Pairs whose chosen reward is above the rejected one.
    pub correct: usize,
}

/// What a DPO step reports besides its loss: the means over the step's pairs.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct PrefStats {
    /// Mean β·(log π − log π_ref) of the chosen responses.
    pub reward_chosen: f64,
    /// The same of the rejected responses.
    pub reward_rejected: f64,
    /// Mean chosen − rejected reward.
    pub margin: f64,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub accuracy: f64,
}

/// Sums over pairs (micro-batches and ranks add up): pairs, chosen rewards, rejected rewards,
/// pairs ranked right.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrefSums(pub [f64; 4]);

impl PrefSums {
    /// Adds a batch's [`PrefOut`].
    pub fn add(&mut self, o: &PrefOut) {
        let n = o.n as f64;
        for (s, v) in self
            .0
            .iter_mut()
            .zip([n, o.reward_chosen * n, o.reward_rejected * n, o.correct as f64])
        {
            *s += v;
        }
    }

    /// The means.
    pub fn stats(&self) -> PrefStats {
        let [n, c, r, k] = self.0;
        let n = n.max(1.0);
        PrefStats {
            reward_chosen: c / n,
            reward_rejected: r / n,
            margin: (c - r) / n,
            accuracy: k / n,
        }
    }
}

/// The preference loss of policy log-probs (B) against constant reference log-probs (B).
pub fn pref_loss(
    pi_chosen: &Tensor,
    pi_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
    kind: PrefLoss,
) -> Result<PrefOut> {
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(Error::Invalid(format!("--beta {beta}: must be a positive number")));
    }
    let c = (pi_chosen - ref_chosen.detach())?;
    let r = (pi_rejected - ref_rejected.detach())?;
    let h = (&c - &r)?;
    let loss = match kind {
        // −log σ(x) = softplus(−x) = max(−x, 0) + log(1 + e^{−|x|}), stable for any x
        PrefLoss::Sigmoid => {
            let x = (h * beta)?;
            (x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?
        }
        PrefLoss::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?.mean_all()?,
    };
    let rc: Vec<f32> = (c.detach() * beta)?.to_vec1()?;
    let rr: Vec<f32> = (r.detach() * beta)?.to_vec1()?;
    let n = rc.len().max(1) as f64;
    let reward_chosen = rc.iter().map(|&x| x as f64).sum::<f64>() / n;
    let reward_rejected = rr.iter().map(|&x| x as f64).sum::<f64>() / n;
    let correct = rc.iter().zip(&rr).filter(|(a, b)| a > b).count();
    Ok(PrefOut {
        loss,
        reward_chosen,
        reward_rejected,
        margin: reward_chosen - reward_rejected,
        accuracy: correct as f64 / n,
        n: rc.len(),
        correct,
    })
}

/// A batch of preference pairs as one (2B, L) sequence batch: the chosen sides first, then the
/// rejected ones, right-padded with id 0 (mask 0) to the longest -> (ids u32, mask f32).
pub fn pair_batch(pairs: &[PrefPair], device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let sides: Vec<&Example> = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
    let len = sides.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if len < 2 {
        return Err(Error::Invalid(
            "a preference batch needs at least one pair of two tokens or more".into(),
        ));
    }
    let mut ids = Vec::with_capacity(sides.len() * len);
    let mut mask = Vec::with_capacity(sides.len() * len);
    for e in &sides {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat(0)).take(len));
        mask.extend(
            e.mask
                .iter()
                .map(|&m| f32::from(u8::from(m)))
                .chain(std::iter::repeat(0.0))
                .take(len),
        );
    }
    Ok((
        Tensor::from_vec(ids, (sides.len(), len), device)?,
        Tensor::from_vec(mask, (sides.len(), len), device)?,
    ))
}

/// The summed response log-probs of each pair's (chosen, rejected) sides -> two (B) tensors,
/// differentiable through `model`.
pub fn pair_logprobs(model: &Model, pairs: &[PrefPair]) -> Result<(Tensor, Tensor)> {
    let (ids, mask) = pair_batch(pairs, &model.device)?;
    let lp = sequence_logprobs(model, &ids, &mask)?;
    let n = pairs.len();
    Ok((lp.narrow(0, 0, n)?, lp.narrow(0, n, n)?))
}

/// The reference model's (chosen, rejected) log-probs of every pair, `batch` pairs per pass,
/// computed once before training (no gradient, nothing of the model kept).
pub fn reference_logprobs(model: &Model, pairs: &[PrefPair], batch: usize) -> Result<Vec<(f32, f32)>> {
    let view = crate::finetune::loss::inference_view(model)?;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let (c, r) = pair_logprobs(&view, chunk)?;
        let (c, r) = (c.to_vec1::<f32>()?, r.to_vec1::<f32>()?);
        out.extend(c.into_iter().zip(r));
    }
    Ok(out)
}

/// The summed response log-probs of each sequence of a training batch ([`Batch`] of `sides`)
/// -> (S) f32, differentiable through `model`: the model's logits only at the learned rows (the
/// trainer's [`crate::finetune::loss::nll_rows`]), summed per sequence by a (S, n) 0/1 matrix.
pub fn batch_logprobs(model: &Model, sides: &[&Example], batch: &Batch, probe: Option<&mut Probe>) -> Result<Tensor> {
    let mut state = model.new_state(batch.ids.dim(0)?)?;
    let logits = model.forward_rows(&batch.ids, &mut state, &batch.rows, probe)?; // (n, V)
    let lp = nll_rows(&logits, &batch.targets, model.fuses_loss(logits.dtype()))?
        .to_dtype(DType::F32)?
        .neg()?; // (n)
    let n = batch.n_targets;
    let mut seg = vec![0f32; sides.len() * n];
    let mut at = 0;
    for (s, e) in sides.iter().enumerate() {
        let k = e.n_targets();
        seg[s * n + at..s * n + at + k].iter_mut().for_each(|x| *x = 1.0);
        at += k;
    }
    let seg = Tensor::from_vec(seg, (sides.len(), n), &model.device)?;
    Ok(seg.matmul(&lp.unsqueeze(1)?)?.squeeze(1)?)
}

/// Both sides of `pairs` as one training batch: the chosen sides first, then the rejected ones.
pub fn pair_sides<'a>(pairs: &[&'a PrefPair]) -> Vec<&'a Example> {
    pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect()
}
