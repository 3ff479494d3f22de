//! Decoding with the key/value cache: the prompt in one run, then one token at a time, each drawn
//! by [`crate::sampling::Sampler`] (greedy at temperature 0, or any of its sampling options).

use super::model::{KvCache, LayerProbe, MoeLm};
use crate::error::{Error, Result};
use crate::sampling::Sampler;

/// Continues `prompt` by up to `max_new` tokens, stopping after `eos` if given. `on_token` sees each
/// new token with the probe of the run that produced its logits (the prompt's run for the first).
/// Returns the new tokens; `cache` holds the prompt and all of them but the last.
pub fn generate(
    model: &MoeLm,
    cache: &mut KvCache,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_new: usize,
    eos: Option<u32>,
    on_token: &mut dyn FnMut(u32, &[LayerProbe]),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty: give at least one token".to_string()));
    }
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(out);
    }
    let (logits, mut probe) = model.forward(prompt, cache)?;
    let t = prompt.len();
    let mut last: Vec<f32> = logits.get(t - 1)?.to_vec1::<f32>()?;
    let mut history = prompt.to_vec();
    loop {
        let next = sampler.sample(&last, &history);
        on_token(next, &probe);
        out.push(next);
        history.push(next);
        if out.len() == max_new || eos == Some(next) {
            return Ok(out);
        }
        let (l, p) = model.step(next, cache)?;
        last = l;
        probe = p;
    }
}
