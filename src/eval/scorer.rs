//! The log-likelihood primitive: `loglikelihood(context, continuation) -> (sum of the
//! continuation's log-probs, whether every one of its tokens is the greedy choice)`, as
//! lm-evaluation-harness computes it (`HFLM._encode_pair` and `_loglikelihood_tokens`).
//!
//! A context is read once; its cache (BlackMamba's recurrent state, a transformer's KV cache) is
//! copied once per continuation and the continuations run as one right-padded batch. Padding
//! after a sequence's end cannot change its earlier positions (the models are causal), so the
//! result equals reading each pair from scratch ([`loglikelihood_full`]).

use candle_core::{DType, Device, Tensor, D};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::state::{LayerState, State};
use crate::model::{Logits, Model};
use crate::tokenizer::encode;

/// What the scorer needs of a model family: logits of a token batch continuing a cache.
pub trait Scorer {
    /// What a read leaves behind for the next tokens (a recurrent state, a KV cache).
    type Cache: Clone;

    /// The device the model runs on (where token batches are built).
    fn device(&self) -> &Device;

    /// An empty cache for `batch` sequences.
    fn empty_cache(&self, batch: usize) -> Result<Self::Cache>;

    /// `n` copies of a one-sequence cache, as one cache of batch `n`.
    fn repeat_cache(&self, cache: &Self::Cache, n: usize) -> Result<Self::Cache>;

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

    fn repeat_cache(&self, cache: &State, n: usize) -> Result<State> {
        if cache.batch != 1 {
            return Err(Error::Invalid(format!(
                "repeat_cache: the state holds {} sequences, expected 1",
                cache.batch
            )));
        }
        let rep = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat((n, 1, 1))?) };
        let layers = cache
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        Ok(LayerState {
                            conv: rep(&l.conv)?,
                            ssm: rep(&l.ssm)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            layers,
            pos: cache.pos,
            batch: n,
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

/// Scores each continuation after `ctx`, reading the context once and sharing its cache: the
/// context's last logits score every continuation's first token, and the continuations (all but
/// their last token) run as one right-padded batch from copies of the cache.
pub fn loglikelihood<S: Scorer>(s: &S, ctx: &[u32], conts: &[Vec<u32>]) -> Result<Vec<LogLik>> {
    check(ctx, conts)?;
    let dev = s.device();
    let mut cache = s.empty_cache(1)?;
    let last = s.logits(&Tensor::from_slice(ctx, (1, ctx.len()), dev)?, &mut cache, true)?; // (1, 1, V)
    let n = conts.len();
    let width = conts.iter().map(Vec::len).max().unwrap_or(1);
    let last = last.repeat((n, 1, 1))?; // (n, 1, V)
    let logits = if width > 1 {
        let mut batch = s.repeat_cache(&cache, n)?;
        let ids = padded(conts, 0, width - 1, dev)?; // inputs: all but the last token
        let rest = s.logits(&ids, &mut batch, false)?; // (n, width-1, V)
        Tensor::cat(&[&last, &rest], 1)?
    } else {
        last
    };
    gather(&logits, conts)
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

/// logits (n, T, V) where row t predicts continuation token t -> the score of each continuation
/// (log-softmax and argmax on the device; only (n, T) numbers come back).
fn gather(logits: &Tensor, conts: &[Vec<u32>]) -> Result<Vec<LogLik>> {
    let (n, t, _) = logits.dims3()?;
    let logits = logits.to_dtype(DType::F32)?;
    let targets = padded(conts, 0, t, logits.device())?; // (n, T)
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?
        .gather(&targets.unsqueeze(2)?, 2)?
        .squeeze(2)?
        .to_vec2::<f32>()?;
    let best = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let mut out = Vec::with_capacity(n);
    for (i, c) in conts.iter().enumerate() {
        let logprob = logp[i][..c.len()].iter().map(|&x| x as f64).sum();
        let greedy = best[i][..c.len()] == c[..];
        out.push(LogLik {
            logprob,
            greedy,
            tokens: c.len(),
        });
    }
    Ok(out)
}
