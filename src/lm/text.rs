//! Text generation with a transformer mixture-of-experts model: the prompt in one run, then one
//! cached step per token ([`crate::moe_lm::MoeLm::step`]), text streamed whole characters at a
//! time with stop strings held back until they can no longer match, as [`crate::generate`] does
//! for BlackMamba, with the same events and outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokenizers::Tokenizer;

use super::probe::SharedProbe;
use crate::error::{Error, Result};
use crate::generate::{stop_scan, GenOutcome, GenStats, StopReason};
use crate::moe_lm::{KvCache, MoeLm};
use crate::runtime::stepper::StepPath;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::TokenStream;

/// What the loop reports as it goes.
pub enum TextEvent<'a> {
    /// The prompt was run; its probe.
    Prefilled { n_tokens: usize, probe: &'a SharedProbe },
    /// A new token and the newly completed text (may be empty); `probe` is the telemetry of the
    /// step that fed it (`None` for the last token, which is not fed).
    Token {
        id: u32,
        pos: usize,
        text: &'a str,
        probe: Option<&'a SharedProbe>,
    },
    /// Text held back until the end (an incomplete character or a partial stop string).
    Tail { text: &'a str },
}

/// Generates from `prompt` after what `cache` holds, stopping at any of `eos` (unless
/// `params.ignore_eos`), a stop string, `params.max_tokens` or `cancel`.
#[allow(clippy::too_many_arguments)]
pub fn generate_text(
    model: &MoeLm,
    tok: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    cancel: &AtomicBool,
    mut on_event: impl FnMut(TextEvent<'_>) -> Result<()>,
) -> Result<GenOutcome> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens; give some text".into()));
    }
    let limit = model.config().max_position_embeddings;
    if cache.pos() + prompt.len() + params.max_tokens > limit {
        return Err(Error::Invalid(format!(
            "{} prompt tokens + {} new ones pass the model's context of {limit} (max_position_embeddings); use a shorter prompt or fewer --max-tokens",
            prompt.len(),
            params.max_tokens
        )));
    }
    let mut sampler = Sampler::new(params.clone());
    let mut history = prompt.to_vec();
    let t0 = Instant::now();
    let (logits, layers) = model.forward(prompt, cache)?;
    let last: Vec<f32> = logits.get(prompt.len() - 1)?.to_vec1()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    on_event(TextEvent::Prefilled {
        n_tokens: prompt.len(),
        probe: &SharedProbe::from_transformer(&layers),
    })?;
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        prefill_secs,
        ..Default::default()
    };
    let mut next = sampler.sample(&last, &history);
    stats.ttft_secs = t0.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    let (mut stream, mut out, mut text, mut shown) = (TokenStream::new(), Vec::new(), String::new(), 0);
    let mut stop = StopReason::MaxTokens;
    let mut pending = None;
    while out.len() < params.max_tokens {
        if cancel.load(Ordering::Relaxed) {
            stop = StopReason::Cancelled;
            break;
        }
        let id = next;
        if eos.contains(&id) && !params.ignore_eos {
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
        let pos = cache.pos();
        if hit.is_some() || out.len() == params.max_tokens {
            on_event(TextEvent::Token {
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
        let (logits, layers) = model.step(id, cache)?;
        next = sampler.sample(&logits, &history);
        on_event(TextEvent::Token {
            id,
            pos,
            text: &new,
            probe: Some(&SharedProbe::from_transformer(&layers)),
        })?;
    }
    if stop != StopReason::StopString {
        if let Some(rest) = stream.flush(tok)? {
            text.push_str(&rest);
        }
        if shown < text.len() {
            let tail = text[shown..].to_string();
            on_event(TextEvent::Tail { text: &tail })?;
        }
    }
    stats.gen_tokens = out.len();
    stats.decode_secs = t_decode.elapsed().as_secs_f64();
    Ok(GenOutcome {
        tokens: out,
        text,
        stats,
        stop,
        pending,
        path: StepPath::Model { reason: None },
    })
}

/// The end-of-text ids of a transformer checkpoint folder: `eos_token_id` (a number or a list) of
/// `generation_config.json`, else of `config.json`; empty when neither names one.
pub fn eos_ids(dir: &std::path::Path) -> Vec<u32> {
    for f in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let ids: Vec<u32> = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect(),
            _ => continue,
        };
        if !ids.is_empty() {
            return ids;
        }
    }
    Vec::new()
}
