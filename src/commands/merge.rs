//! `blackmamba merge`: base model + adapter -> a plain model folder (config.json,
//! model.safetensors with the adapter folded into the weights, tokenizer.json). Without
//! `--adapter` it re-saves the model itself, e.g. in another `--save-dtype`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::commands::ModelArgs;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written matrices: f32, bf16 or f16 (default: --dtype's). A_log, D, norms,
    /// router and conv stay f32.
    #[arg(long)]
    pub save_dtype: Option<String>,
}

pub fn run(m: &ModelArgs, a: &MergeArgs) -> anyhow::Result<()> {
    let loaded = super::load(m)?;
    let dtype = match &a.save_dtype {
        Some(s) => crate::loader::dtype(Some(s), &loaded.model.device)?,
        None => loaded.model.dtype,
    };
    loaded
        .model
        .save_dir(&a.out, dtype)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let tok = loaded
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    crate::model::weights::write_atomic(&a.out.join("tokenizer.json"), tok.as_bytes())?;
    eprintln!("wrote {} ({}) in {dtype:?}", a.out.display(), loaded.label);
    Ok(())
}
