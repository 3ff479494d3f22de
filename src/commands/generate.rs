//! `blackmamba generate`: prompt in, streamed text out.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use clap::Args;

use crate::commands::prompt::PromptSource;
use crate::commands::ModelArgs;
use crate::generate::{generate, GenEvent, StopReason};
use crate::lm::text::{generate_text, TextEvent};
use crate::lm::AnyModel;
use crate::sampling::SamplingParams;

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// Read the prompt from a UTF-8 file; `-` reads standard input.
    #[arg(long, group = "input", value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
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
    /// Print one JSON object (text, stop reason, token counts, speeds) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// `generate --json`.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    text: &'a str,
    stop: StopReason,
    prompt_tokens: usize,
    generated_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_s: f64,
    model: &'a str,
    device: &'static str,
    dtype: String,
    /// The decode path (CUDA decoder with device or host sampling, or `Model::step`).
    decode_path: String,
}

pub fn run(m: &ModelArgs, a: &GenerateArgs) -> anyhow::Result<()> {
    let prompt = PromptSource::from_args(a.prompt.as_deref(), a.prompt_file.as_deref())
        .ok_or_else(|| anyhow::anyhow!("give the prompt with --prompt TEXT or --prompt-file PATH"))?
        .read()?;
    let loaded = super::load_any(m)?;
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
    let ids = crate::tokenizer::encode(&loaded.tokenizer, &prompt)?;
    let cancel = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let stream = !a.json;
    let mut emit = |text: &str| -> crate::Result<()> {
        if stream {
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| crate::Error::io("stdout", e))?;
        }
        Ok(())
    };
    let (outcome, path) = match &loaded.model {
        AnyModel::BlackMamba(model) => {
            let mut state = model.new_state(1)?;
            let o = generate(model, &loaded.tokenizer, &mut state, &ids, &params, false, &cancel, |ev| match ev {
                GenEvent::Token { text, .. } | GenEvent::Tail { text } => emit(text),
                GenEvent::Prefilled { .. } => Ok(()),
            })?;
            let path = o.path.to_string();
            (o, path)
        }
        AnyModel::Transformer(model) => {
            let mut cache = model.new_cache();
            let o = generate_text(
                model,
                &loaded.tokenizer,
                &mut cache,
                &ids,
                &params,
                &loaded.eos,
                &cancel,
                |ev| match ev {
                    TextEvent::Token { text, .. } | TextEvent::Tail { text } => emit(text),
                    TextEvent::Prefilled { .. } => Ok(()),
                },
            )?;
            (o, "key/value cache, one MoeLm::step per token".to_string())
        }
    };
    let s = outcome.stats;
    let device = if loaded.model.device().is_cuda() { "cuda" } else { "cpu" };
    let dtype = loaded.model.dtype();
    if a.json {
        let report = Report {
            text: &outcome.text,
            stop: outcome.stop,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.gen_tokens,
            prefill_tok_s: s.prefill_tok_s(),
            decode_tok_s: s.decode_tok_s(),
            ttft_s: s.ttft_secs,
            model: &loaded.label,
            device,
            dtype: format!("{dtype:?}").to_lowercase(),
            decode_path: path,
        };
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(out)?;
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, device: {}, dtype: {:?}, decode path: {}",
        s.prompt_tokens,
        s.gen_tokens,
        s.prefill_tok_s(),
        s.decode_tok_s(),
        device,
        dtype,
        path
    );
    Ok(())
}
