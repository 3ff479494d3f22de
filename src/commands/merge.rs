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
    /// Dtype of the written matrices (default: --dtype's). A_log, D, norms, router and conv stay
    /// f32.
    #[arg(long, value_enum)]
    pub save_dtype: Option<crate::loader::DTypeArg>,
}

pub fn run(m: &ModelArgs, a: &MergeArgs) -> anyhow::Result<()> {
    let loaded = super::load(m)?;
    let dtype = a.save_dtype.map_or(loaded.model.dtype, crate::loader::DTypeArg::dtype);
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
