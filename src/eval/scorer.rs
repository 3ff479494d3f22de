//! The log-likelihood primitive: `loglikelihood(context, continuation) -> (sum of the
//! continuation's log-probs, whether every one of its tokens is the greedy choice)`, as
//! lm-evaluation-harness computes it (`HFLM._encode_pair` and `_loglikelihood_tokens`).
//!
//! A context is read once; its cache (BlackMamba's recurrent state, a transformer's KV cache) is
//! copied once per continuation and the continuations run as one right-padded batch. Padding
//! after a sequence's end cannot change its earlier positions (the models are causal), so the
//! result equals reading each pair from scratch ([`loglikelihood_full`]).

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::state::{LayerState, State};
use crate::model::{Logits, Model};
use crate::ops::fast_exp::exp_f32;
use crate::tokenizer::encode;

/// What the scorer needs of a model family: logits of a token batch continuing a cache.
pub trait Scorer {
    /// What a read leaves behind for the next tokens (a recurrent state, a KV cache).
    type Cache: Clone;

    /// The device the model runs on (where token batches are built).
    fn device(&self) -> &Device;

    /// An empty cache for `batch` sequences.
    fn empty_cache(&self, batch: usize) -> Result<Self::Cache>;

    /// One-sequence caches stacked into one cache of batch `caches.len()` (a cache may appear
    /// several times: one copy per continuation that continues it).
    fn gather_cache(&self, caches: &[&Self::Cache]) -> Result<Self::Cache>;

    /// Reads ids (B, L) u32 continuing `cache` -> f32 logits (B, L, V), or (B, 1, V) of the last
    /// position when `last_only`; leaves `cache` after the last token.
    fn logits(&self, ids: &Tensor, cache: &mut Self::Cache, last_only: bool) -> Result<Tensor>;
}

impl Scorer for Model {
    type Cache = State;

    fn device(&self) -> &Device {
        &self.device
    }

    fn empty_cache(&self, batch: usize) -> Result<State> {
        self.new_state(batch)
    }

    fn gather_cache(&self, caches: &[&State]) -> Result<State> {
        let first = caches
            .first()
            .ok_or_else(|| Error::Invalid("gather_cache: no states to stack".into()))?;
        if let Some(c) = caches.iter().find(|c| c.batch != 1) {
            return Err(Error::Invalid(format!(
                "gather_cache: a state holds {} sequences, expected 1",
                c.batch
            )));
        }
        let stack = |pick: &dyn Fn(&LayerState) -> &Tensor, i: usize| -> Result<Tensor> {
            let parts = caches
                .iter()
                .map(|c| {
                    c.layers
                        .get(i)
                        .and_then(Option::as_ref)
                        .map(pick)
                        .ok_or_else(|| Error::Invalid(format!("gather_cache: a state lacks layer {i}")))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let layers = first
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.as_ref()
                    .map(|_| {
                        Ok(LayerState {
                            conv: stack(&|l| &l.conv, i)?,
                            ssm: stack(&|l| &l.ssm, i)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            layers,
            pos: first.pos,
            batch: caches.len(),
        })
    }

    fn logits(&self, ids: &Tensor, cache: &mut State, last_only: bool) -> Result<Tensor> {
        let which = if last_only { Logits::Last } else { Logits::All };
        self.forward(ids, cache, which, None)
    }
}

/// The score of one continuation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLik {
    /// Sum of the continuation tokens' log-probabilities (natural log).
    pub logprob: f64,
    /// Whether every continuation token is the argmax of its position.
    pub greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
}

/// Whitespace as Python's `str.isspace` sees it (Unicode White_Space plus U+001C..U+001F), which
/// `str.rstrip()` removes.
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// lm-eval's tokenisation of a (context, continuation) pair for each of `continuations`: the
/// context's trailing whitespace moves to the front of the continuation; the context is encoded
/// on its own; a continuation's tokens are what follows the context's token count inside the
/// encoding of context + continuation. An empty context becomes `[eot]` and the continuation is
/// encoded alone. The context after the move must be the same for every continuation (it is:
/// the move depends on the context only).
pub fn encode_pair(tok: &Tokenizer, eot: u32, context: &str, continuations: &[String]) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let ctx = context.trim_end_matches(py_space);
    let moved = &context[ctx.len()..];
    if context.is_empty() {
        let conts = continuations.iter().map(|c| encode(tok, c)).collect::<Result<Vec<_>>>()?;
        return check_conts(vec![eot], conts, continuations);
    }
    let ctx_enc = encode(tok, ctx)?;
    let mut conts = Vec::with_capacity(continuations.len());
    for c in continuations {
        let whole = encode(tok, &format!("{ctx}{moved}{c}"))?;
        conts.push(whole.get(ctx_enc.len()..).unwrap_or_default().to_vec());
    }
    check_conts(ctx_enc, conts, continuations)
}

fn check_conts(ctx: Vec<u32>, conts: Vec<Vec<u32>>, texts: &[String]) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    if let Some(i) = conts.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!(
            "continuation {:?} encodes to no tokens after its context; every choice needs at least one token",
            texts.get(i).map(String::as_str).unwrap_or_default()
        )));
    }
    if ctx.is_empty() {
        return Err(Error::Invalid("context encodes to no tokens".into()));
    }
    Ok((ctx, conts))
}

/// One request: a context and the continuations scored after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub ctx: Vec<u32>,
    pub conts: Vec<Vec<u32>>,
}

/// Logit values held at once by [`loglikelihood_batch`]'s continuation batches (rows × width × V
/// f32): 32 Mi values, 128 MiB.
pub const BATCH_LOGITS: usize = 1 << 25;

/// Scores each continuation after `ctx`, reading the context once and sharing its cache: the
/// context's last logits score every continuation's first token, and the continuations (all but
/// their last token) run as one right-padded batch from copies of the cache.
pub fn loglikelihood<S: Scorer>(s: &S, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<LogLik>> {
    let pair = Pair {
        ctx: ctx.to_vec(),
        conts: conts.to_vec(),
    };
    let mut out = loglikelihood_batch(s, std::slice::from_ref(&pair))?;
    out.pop()
        .ok_or_else(|| Error::Invalid("loglikelihood: the batch returned no scores".into()))
}

/// [`loglikelihood`] of many requests: each context is read once (batch 1, last logits only),
/// then the continuations of all requests run together from copies of their contexts' caches, in
/// right-padded batches of at most [`BATCH_LOGITS`] logit values. Padding after a sequence's end
/// never reaches its scored positions, so each score equals that of its request alone. (`eval`
/// passes one document's requests at a time: on the embedded model on the CPU, batches of 8 or
/// 32 documents took 20% more CPU time than one, the padding costing more than the larger
/// matmuls saved.)
pub fn loglikelihood_batch<S: Scorer>(s: &S, reqs: &[Pair]) -> Result<Vec<Vec<LogLik>>> {
    let dev = s.device();
    // every context: its last logits row (V) on the host and its cache
    let mut first = Vec::with_capacity(reqs.len());
    let mut caches = Vec::with_capacity(reqs.len());
    for r in reqs {
        check(&r.ctx, &r.conts)?;
        let mut cache = s.empty_cache(1)?;
        let last = s.logits(&Tensor::from_slice(&r.ctx, (1, r.ctx.len()), dev)?, &mut cache, true)?; // (1, 1, V)
        first.push(last.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        caches.push(cache);
    }
    let mut out: Vec<Vec<LogLik>> = reqs.iter().map(|r| Vec::with_capacity(r.conts.len())).collect();
    // continuations in order, longest first within each batch to waste little padding
    let mut rows: Vec<(usize, usize)> = reqs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..r.conts.len()).map(move |j| (i, j)))
        .collect();
    let cont = |&(i, j): &(usize, usize)| &reqs[i].conts[j];
    let vocab = first.first().map_or(1, Vec::len).max(1);
    let mut scores: Vec<Option<LogLik>> = vec![None; rows.len()];
    let index: std::collections::HashMap<(usize, usize), usize> = rows.iter().enumerate().map(|(k, &r)| (r, k)).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(cont(r).len()));
    let mut at = 0;
    while at < rows.len() {
        let width = cont(&rows[at]).len(); // the longest of this batch
        let per_row = (width.saturating_sub(1)).max(1) * vocab;
        let take = (BATCH_LOGITS / per_row).clamp(1, rows.len() - at);
        let batch = &rows[at..at + take];
        let rest = if width > 1 {
            let cache_refs: Vec<&S::Cache> = batch.iter().map(|&(i, _)| &caches[i]).collect();
            let mut cache = s.gather_cache(&cache_refs)?;
            let seqs: Vec<Vec<u32>> = batch.iter().map(|r| cont(r).clone()).collect();
            let ids = padded(&seqs, 0, width - 1, dev)?; // inputs: all but the last token
            let logits = s.logits(&ids, &mut cache, false)?; // (take, width-1, V)
            Some(logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        for (b, r) in batch.iter().enumerate() {
            let c = cont(r);
            let row_of = |t: usize| -> &[f32] {
                match (t, &rest) {
                    (0, _) | (_, None) => &first[r.0],
                    (t, Some(l)) => &l[(b * (width - 1) + t - 1) * vocab..(b * (width - 1) + t) * vocab],
                }
            };
            let mut ll = LogLik {
                logprob: 0.0,
                greedy: true,
                tokens: c.len(),
            };
            for (t, &tok) in c.iter().enumerate() {
                let (lp, best) = log_prob(row_of(t), tok)?;
                ll.logprob += lp;
                ll.greedy &= best == tok;
            }
            scores[index[r]] = Some(ll);
        }
        at += take;
    }
    for (k, (i, _)) in reqs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..r.conts.len()).map(move |j| (i, j)))
        .enumerate()
    {
        out[i].push(scores[k].ok_or_else(|| Error::Invalid("loglikelihood: a continuation was not scored".into()))?);
    }
    Ok(out)
}

/// log softmax(row)[tok] (f64) and the row's argmax (the first on ties), in one pass for the max
/// and one for the sum of exponentials (f32 lanes, vectorised, summed in f64).
fn log_prob(row: &[f32], tok: u32) -> Result<(f64, u32)> {
    let x = *row
        .get(tok as usize)
        .ok_or_else(|| Error::Invalid(format!("token {tok} is outside the model's {} logits", row.len())))?;
    let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            (best, max) = (i, v);
        }
    }
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut sum = 0f64;
    for (n, c) in chunks.enumerate() {
        for k in 0..LANES {
            acc[k] += exp_f32(c[k] - max);
        }
        if n % 64 == 63 {
            // at most 64 terms ≤ 1 per lane in f32, then into the f64 sum
            sum += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
            acc = [0f32; LANES];
        }
    }
    sum += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    sum += tail.iter().map(|&v| f64::from(exp_f32(v - max))).sum::<f64>();
    Ok((f64::from(x - max) - sum.ln(), best as u32))
}

/// Scores each continuation by reading context + continuation from scratch in one full-sequence
/// pass (a right-padded batch): the reference [`loglikelihood`] must equal, and the "state reuse
/// off" path.
pub fn loglikelihood_full<S: Scorer>(s: &S, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<LogLik>> {
    check(ctx, conts)?;
    let dev = s.device();
    let joined: Vec<Vec<u32>> = conts.iter().map(|c| [ctx, c.as_slice()].concat()).collect();
    let width = joined.iter().map(Vec::len).max().unwrap_or(1);
    let mut cache = s.empty_cache(conts.len())?;
    let ids = padded(&joined, 0, width - 1, dev)?;
    let logits = s.logits(&ids, &mut cache, false)?; // (n, width-1, V)
                                                     // the rows that predict the continuation: positions ctx.len()-1 ..
    let width_c = conts.iter().map(Vec::len).max().unwrap_or(1);
    let logits = logits.narrow(1, ctx.len() - 1, width_c)?;
    gather(&logits, conts)
}

fn check(ctx: &[u32], conts: &[Vec<u32>]) -> Result<()> {
    if ctx.is_empty() || conts.is_empty() || conts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid(
            "loglikelihood needs a non-empty context and at least one non-empty continuation".into(),
        ));
    }
    Ok(())
}

/// Rows of `seqs` cut or padded (with each row's last token) to `width` from `start` -> (n, width) u32.
fn padded(seqs: &[Vec<u32>], start: usize, width: usize, dev: &Device) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(seqs.len() * width);
    for s in seqs {
        let fill = s.last().copied().unwrap_or(0);
        flat.extend((0..width).map(|j| s.get(start + j).copied().unwrap_or(fill)));
    }
    Ok(Tensor::from_vec(flat, (seqs.len(), width), dev)?)
}

/// logits (n, T, V) where row t predicts continuation token t -> the score of each continuation,
/// by the same host arithmetic as [`loglikelihood_batch`] ([`log_prob`]), so the two paths differ
/// only by the model's own rounding.
fn gather(logits: &Tensor, conts: &[Vec<u32>]) -> Result<Vec<LogLik>> {
    let (_, t, v) = logits.dims3()?;
    let host = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    conts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut ll = LogLik {
                logprob: 0.0,
                greedy: true,
                tokens: c.len(),
            };
            for (j, &tok) in c.iter().enumerate().take(t) {
                let (lp, best) = log_prob(&host[(i * t + j) * v..(i * t + j + 1) * v], tok)?;
                ll.logprob += lp;
                ll.greedy &= best == tok;
            }
            Ok(ll)
        })
        .collect()
}
