//! `blackmamba bench --context 1k,4k,16k,64k`: decode speed against context length, the
//! BlackMamba paper's latency claim (flat for the recurrent state, falling for attention) measured
//! on either family. For each context length the model's memory is filled with that many tokens,
//! then `--gen-len` tokens are generated on the user's path ([`crate::generate::generate`] for
//! BlackMamba, [`crate::lm::text::generate_text`] for OLMoE / Mixtral) with the default sampling
//! settings, end-of-text ignored; the time per token comes from the generation's own decode timer.
//!
//! The context is filled either by running random token ids through the model in chunks
//! (`prefill`: the real thing, slow on a CPU at 64k) or by drawing it (`synthetic`): a key/value
//! cache of exactly as many random keys and values as the context (the next token's attention
//! reads all of them, as after a real prefill), or a random recurrent state (whose size does not
//! depend on the context). Either way the memory really holds the context when decoding starts,
//! and the row reports its size in bytes.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lm::AnyModel;
use crate::model::Logits;
use crate::sampling::SamplingParams;

/// How the context is put into the cache or state before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ContextFill {
    /// Run random token ids through the model in chunks.
    Prefill,
    /// Draw a cache of random keys and values of the context's length (a random state for
    /// BlackMamba).
    Synthetic,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ContextOpts {
    /// Context lengths, in tokens, in the order given.
    pub contexts: Vec<usize>,
    /// Tokens generated at each context (at least 2).
    pub gen_len: usize,
    /// How the context is filled.
    pub fill: ContextFill,
    /// Tokens per forward call of the `prefill` fill.
    pub chunk: usize,
    /// Seed of the random token ids.
    pub seed: u64,
}

/// One context length's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextRow {
    /// Tokens in the cache or state when decoding starts.
    pub context: usize,
    /// Decode steps timed.
    pub tokens: usize,
    /// Decoded tokens per second.
    pub tok_s: f64,
    /// Milliseconds per decoded token.
    pub ms_per_token: f64,
    /// Bytes of the key/value cache (transformer) or recurrent state (BlackMamba) at `context`.
    pub memory_bytes: usize,
    /// Seconds the fill took.
    pub fill_secs: f64,
}

/// The report of `bench --context`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextReport {
    /// The model's label.
    pub model: String,
    /// `blackmamba`, `olmoe` or `mixtral`.
    pub family: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The compute dtype.
    pub dtype: String,
    /// What `memory_bytes` counts: `kv-cache` or `state`.
    pub memory: String,
    /// How the contexts were filled.
    pub fill: ContextFill,
    /// One row per context length.
    pub rows: Vec<ContextRow>,
}

/// Parses a comma-separated list of context lengths: plain numbers (`1024`) or with a `k` suffix
/// for thousands of 1024 (`4k`, `64K`).
pub fn parse_contexts(list: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim) {
        let (num, mul) = match part.strip_suffix(['k', 'K']) {
            Some(n) => (n, 1024),
            None => (part, 1),
        };
        let n = num.parse::<usize>().ok().and_then(|n| n.checked_mul(mul)).ok_or_else(|| {
            Error::Invalid(format!(
                "--context '{part}': give context lengths as numbers of tokens, comma-separated, e.g. 1k,4k,16k,64k or 1024,4096"
            ))
        })?;
        if n == 0 {
            return Err(Error::Invalid("--context 0: a context length must be at least 1 token".into()));
        }
        out.push(n);
    }
    Ok(out)
}

/// Checks the options against the model before any work: a transformer must fit each context plus
/// the generated tokens in its `max_position_embeddings`.
pub fn check(model: &AnyModel, o: &ContextOpts) -> Result<()> {
    if o.contexts.is_empty() {
        return Err(Error::Invalid("--context: give at least one context length, e.g. 1k,4k".into()));
    }
    if o.gen_len < 2 {
        return Err(Error::Invalid(format!(
            "--gen-len {}: bench --context times at least 2 generated tokens",
            o.gen_len
        )));
    }
    if o.chunk == 0 {
        return Err(Error::Invalid("--fill-chunk 0: give at least 1 token per forward call".into()));
    }
    if let AnyModel::Transformer(m) = model {
        let limit = m.config().max_position_embeddings;
        // the context, one prompt token on top of it, and the generated tokens
        if let Some(&c) = o.contexts.iter().find(|&&c| c + 1 + o.gen_len > limit) {
            return Err(Error::Invalid(format!(
                "--context {c}: with --gen-len {} it passes the model's context of {limit} tokens (max_position_embeddings); use contexts up to {}",
                o.gen_len,
                limit.saturating_sub(1 + o.gen_len)
            )));
        }
    }
    Ok(())
}

/// Runs the measurement on a loaded model of either family.
pub fn run(model: &AnyModel, tok: &tokenizers::Tokenizer, eos: &[u32], label: &str, o: &ContextOpts) -> Result<ContextReport> {
    check(model, o)?;
    let vocab = model.vocab_size().min(50277);
    let mut rng = crate::rng::Rng::new(o.seed);
    let params = SamplingParams {
        max_tokens: o.gen_len,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let warm = SamplingParams {
        max_tokens: 4,
        ..params.clone()
    };
    let mut rows = Vec::with_capacity(o.contexts.len());
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut warmed = false;
    for &c in &o.contexts {
        let ids: Vec<u32> = (0..=c).map(|_| rng.below(vocab) as u32).collect();
        let (fill, prompt) = ids.split_at(c);
        let t0 = std::time::Instant::now();
        let stats = match model {
            AnyModel::BlackMamba(m) => {
                if !warmed {
                    crate::generate::generate(m, tok, &mut m.new_state(1)?, prompt, &warm, false, &cancel, |_| Ok(()))?;
                }
                let mut st = m.new_state(1)?;
                match o.fill {
                    ContextFill::Prefill => {
                        for part in fill.chunks(o.chunk) {
                            let t = candle_core::Tensor::from_slice(part, (1, part.len()), &m.device)?;
                            m.forward(&t, &mut st, Logits::Last, None)?;
                        }
                    }
                    ContextFill::Synthetic => {
                        for l in st.layers.iter_mut().flatten() {
                            l.conv = l.conv.randn_like(0.0, 1.0)?;
                            l.ssm = l.ssm.randn_like(0.0, 1.0)?;
                        }
                        st.pos = c;
                    }
                }
                m.device.synchronize()?;
                let fill_secs = t0.elapsed().as_secs_f64();
                let bytes = state_bytes(&st);
                let out = crate::generate::generate(m, tok, &mut st, prompt, &params, false, &cancel, |_| Ok(()))?;
                (out.stats, bytes, fill_secs)
            }
            AnyModel::Transformer(m) => {
                if !warmed {
                    crate::lm::text::generate_text(m, tok, &mut m.new_cache(), prompt, &warm, eos, &cancel, |_| Ok(()))?;
                }
                let mut cache = match o.fill {
                    ContextFill::Prefill => {
                        let mut cache = m.new_cache();
                        for part in fill.chunks(o.chunk) {
                            m.forward(part, &mut cache)?;
                        }
                        cache
                    }
                    ContextFill::Synthetic => m.synthetic_cache(c)?,
                };
                m.device().synchronize()?;
                let fill_secs = t0.elapsed().as_secs_f64();
                let bytes = cache.bytes();
                let out = crate::lm::text::generate_text(m, tok, &mut cache, prompt, &params, eos, &cancel, |_| Ok(()))?;
                (out.stats, bytes, fill_secs)
            }
        };
        warmed = true;
        let (stats, memory_bytes, fill_secs) = stats;
        let steps = stats.gen_tokens.saturating_sub(1).max(1);
        let per = stats.decode_secs / steps as f64;
        rows.push(ContextRow {
            context: c,
            tokens: steps,
            tok_s: if per > 0.0 { 1.0 / per } else { 0.0 },
            ms_per_token: per * 1e3,
            memory_bytes,
            fill_secs,
        });
    }
    Ok(ContextReport {
        model: label.to_string(),
        family: model.family().to_string(),
        device: if model.device().is_cuda() { "cuda".into() } else { "cpu".into() },
        dtype: super::dtype_name(model.dtype()),
        memory: match model {
            AnyModel::BlackMamba(_) => "state".into(),
            AnyModel::Transformer(_) => "kv-cache".into(),
        },
        fill: o.fill,
        rows,
    })
}

/// Bytes of a recurrent state's tensors.
fn state_bytes(st: &crate::model::state::State) -> usize {
    st.layers
        .iter()
        .flatten()
        .map(|l| (l.conv.elem_count() + l.ssm.elem_count()) * l.conv.dtype().size_in_bytes())
        .sum()
}
