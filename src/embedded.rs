//! The embedded default model: `assets/default/` (config.json, model.safetensors, tokenizer.json),
//! trained by this project. Until it ships, callers fall back to random demo weights.

use std::path::PathBuf;

/// The folder of the default model, when this build has one.
pub fn default_model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/default"));
    dir.join("config.json").is_file().then_some(dir)
}
