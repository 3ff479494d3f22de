//! Prefill + decode: the loop shared by `blackmamba generate`, the benchmark and the TUI engine.
//!
//! The prompt goes through the full-sequence path in one call, then one `step` per new token with
//! the recurrent state. Text is streamed whole-character by whole-character; stop strings are held
//! back until they can no longer match; a cancel flag is checked between tokens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::Result;
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::{Logits, Model};
use crate::runtime::stepper::{StepPath, Stepper};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TokenStream, EOS_ID};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    Cancelled,
}

/// Timings of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub gen_tokens: usize,
    /// Time of the decode steps after the first token.
    pub decode_secs: f64,
    /// Time to first token (prefill + first sample).
    pub ttft_secs: f64,
}

impl GenStats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    /// Decode rate over the tokens that needed a step (all but the first).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.gen_tokens.saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// What the loop reports as it goes.
pub enum GenEvent<'a> {
    /// The prompt was read; telemetry of its tokens when probing.
    Prefilled { n_tokens: usize, probe: Option<&'a Probe> },
    /// A new token; `text` is the newly completed text (may be empty); `probe` its telemetry.
    Token {
        id: u32,
        pos: usize,
        text: &'a str,
        probe: Option<&'a Probe>,
    },
    /// Text held back until the end (an incomplete character or a partial stop string).
    Tail { text: &'a str },
}

/// The end of a generation.
#[derive(Debug, Clone)]
pub struct GenOutcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stats: GenStats,
    pub stop: StopReason,
    /// The last sampled token, not yet fed to the state: feed it first on the next turn.
    pub pending: Option<u32>,
    /// Which path decoded (the CUDA decoder, or `Model::step` and why).
    pub path: StepPath,
}

/// Generates from `prompt` (may be empty when `state` already holds a context, or it starts with
/// end-of-text), continuing `state`.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    state: &mut State,
    prompt: &[u32],
    params: &SamplingParams,
    probe: bool,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(GenEvent<'_>) -> Result<()>,
) -> Result<GenOutcome> {
    params.validate()?;
    let prompt: Vec<u32> = if prompt.is_empty() { vec![EOS_ID] } else { prompt.to_vec() };
    model.check_ids(&prompt)?;
    let dev = &model.device;
    let mut sampler = Sampler::new(params.clone());
    let mut history = prompt.clone();
    let t0 = Instant::now();
    let mut p = probe.then(Probe::new);
    let ids = Tensor::from_slice(&prompt, (1, prompt.len()), dev)?;
    let logits = model.forward(&ids, state, Logits::Last, p.as_mut())?; // (1, 1, V)
    let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    on_event(GenEvent::Prefilled {
        n_tokens: prompt.len(),
        probe: p.as_ref(),
    })?;

    let mut stream = TokenStream::new();
    let mut out = Vec::new();
    let mut text = String::new(); // everything decoded
    let mut shown = 0; // bytes of `text` already reported
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        prefill_secs,
        ..Default::default()
    };
    // the first token from the prefill's logits (host); every later one from a step
    let mut next = sampler.sample(&logits, &history);
    stats.ttft_secs = t0.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    let mut stepper = Stepper::new(model, state, probe, &sampler, &history)?;
    let mut stop = StopReason::MaxTokens;
    let mut pending = None;
    while out.len() < params.max_tokens {
        if cancel.load(Ordering::Relaxed) {
            stop = StopReason::Cancelled;
            break;
        }
        let id = next;
        if id == EOS_ID && !params.ignore_eos {
            stop = StopReason::Eos;
            pending = Some(id);
            break;
        }
        out.push(id);
        history.push(id);
        if let Some(piece) = stream.push(tok, id)? {
            text.push_str(&piece);
        }
        let (hit, safe) = stop_scan(&text, shown, &params.stop);
        let new = text.get(shown..safe).unwrap_or_default().to_string();
        shown = safe.max(shown);
        let pos = state.pos;
        // A stop string or the token budget ends it here; this last token is not fed.
        if hit.is_some() || out.len() == params.max_tokens {
            on_event(GenEvent::Token {
                id,
                pos,
                text: &new,
                probe: None,
            })?;
            pending = Some(id);
            if hit.is_some() {
                text.truncate(safe);
                stop = StopReason::StopString;
            }
            break;
        }
        // Feed the token and get the next (also gives its telemetry).
        let mut sp = probe.then(Probe::new);
        next = stepper.next(model, id, state, sp.as_mut(), &mut sampler, &history)?;
        on_event(GenEvent::Token {
            id,
            pos,
            text: &new,
            probe: sp.as_ref(),
        })?;
    }
    if stop != StopReason::StopString {
        if let Some(rest) = stream.flush(tok)? {
            text.push_str(&rest);
        }
        if shown < text.len() {
            let tail = text[shown..].to_string();
            on_event(GenEvent::Tail { text: &tail })?;
        }
    }
    let path = stepper.path().clone();
    stepper.finish(model, state)?;
    stats.gen_tokens = out.len();
    stats.decode_secs = t_decode.elapsed().as_secs_f64();
    Ok(GenOutcome {
        tokens: out,
        text,
        stats,
        stop,
        pending,
        path,
    })
}

/// Stop strings over the text so far, of which `shown` bytes are already out: the first match
/// at or after `shown` (where the text ends), and how far the text may be shown now (up to the
/// match, else up to what can no longer start one).
pub fn stop_scan(text: &str, shown: usize, stops: &[String]) -> (Option<usize>, usize) {
    let hit = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[shown.min(text.len())..].find(s.as_str()).map(|i| shown + i))
        .min();
    (hit, hit.unwrap_or_else(|| safe_prefix(text, shown, stops)))
}

/// The end of the part of `text` (from `shown`) that cannot be the start of a stop string.
pub fn safe_prefix(text: &str, shown: usize, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        // longest suffix of text that is a proper prefix of s
        for k in (1..s.len()).rev() {
            if text.len() >= k && text.is_char_boundary(text.len() - k) && s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe.max(shown)
}
