//! `blackmamba generate`: prompt in, streamed text out.

use std::io::Write;
use std::sync::atomic::AtomicBool;

use clap::Args;

use crate::commands::ModelArgs;
use crate::generate::{generate, GenEvent};
use crate::sampling::SamplingParams;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Drop tokens below this fraction of the top probability (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f64,
    /// Penalty for tokens of the last 64 (1 = off).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

pub fn run(m: &ModelArgs, a: &GenerateArgs) -> anyhow::Result<()> {
    let loaded = super::load(m)?;
    if loaded.untrained {
        eprintln!("note: {} has untrained random weights; its text is noise", loaded.label);
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: 64,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    let model = &loaded.model;
    let ids = crate::tokenizer::encode(&loaded.tokenizer, &a.prompt)?;
    let mut state = model.new_state(1)?;
    let cancel = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let outcome = generate(model, &loaded.tokenizer, &mut state, &ids, &params, false, &cancel, |ev| {
        if let GenEvent::Token { text, .. } | GenEvent::Tail { text } = ev {
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| crate::Error::io("stdout", e))?;
        }
        Ok(())
    })?;
    writeln!(out)?;
    let s = outcome.stats;
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, device: {}, dtype: {:?}, decode path: {}",
        s.prompt_tokens,
        s.gen_tokens,
        s.prefill_tok_s(),
        s.decode_tok_s(),
        if model.device.is_cuda() { "cuda" } else { "cpu" },
        model.dtype,
        outcome.path
    );
    Ok(())
}
