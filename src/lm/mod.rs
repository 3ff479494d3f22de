//! One model type above the two families (issue 19): BlackMamba ([`crate::model::Model`]) and the
//! transformer mixture-of-experts models ([`crate::moe_lm::MoeLm`]: OLMoE, Mixtral). `--model DIR`
//! picks the family from `config.json`'s `model_type` ([`family_of`]); every other source is
//! BlackMamba. Commands that work on both (`generate`, `logits`, `trace`, `analyze --compare`) load
//! through [`load_any`] and share [`probe::SharedProbe`] and [`run::Runner`].
//!
//! - [`probe`]: top-k routes, probabilities, entropy and memory per layer, for both families.
//! - [`run`]: teacher-forced runs in chunks carrying the state or the key/value cache.
//! - [`text`]: streamed text generation with a transformer (stop strings, statistics).

pub mod probe;
pub mod run;
pub mod text;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::loader::{LoadOpts, ModelSource};
use crate::model::Model;
use crate::moe_lm::{Family, MoeLm};

/// A model of either family.
pub enum AnyModel {
    /// BlackMamba (Mamba + top-1 MoE).
    BlackMamba(Box<Model>),
    /// OLMoE or Mixtral (attention + top-k MoE).
    Transformer(Box<MoeLm>),
}

impl AnyModel {
    /// The family's name for reports: `blackmamba`, `olmoe` or `mixtral`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::BlackMamba(_) => "blackmamba",
            Self::Transformer(m) => m.config().family.model_type(),
        }
    }

    /// Vocabulary size of the embedding.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::BlackMamba(m) => m.cfg.vocab_size,
            Self::Transformer(m) => m.config().vocab_size,
        }
    }

    /// Layers of the model (BlackMamba: half-blocks; transformer: decoder layers).
    pub fn num_layers(&self) -> usize {
        match self {
            Self::BlackMamba(m) => m.cfg.num_layers,
            Self::Transformer(m) => m.config().num_hidden_layers,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            Self::BlackMamba(m) => &m.device,
            Self::Transformer(m) => m.device(),
        }
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        match self {
            Self::BlackMamba(m) => m.dtype,
            Self::Transformer(m) => m.dtype(),
        }
    }

    /// Fails with [`Error::TokenOutOfVocab`] on an id the model has no row for.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(&id) => Err(Error::TokenOutOfVocab { id, vocab }),
            None => Ok(()),
        }
    }
}

/// A loaded model of either family with its tokenizer.
pub struct AnyLoaded {
    /// The model.
    pub model: AnyModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// A short name for status lines and reports.
    pub label: String,
    /// Set for random weights.
    pub untrained: bool,
    /// Seconds the load took.
    pub load_secs: f64,
    /// What the user should know about this load, one line each.
    pub notes: Vec<String>,
    /// End-of-text ids (BlackMamba: the GPT-NeoX `<|endoftext|>`; a transformer: its config's).
    pub eos: Vec<u32>,
}

impl From<crate::loader::Loaded> for AnyLoaded {
    fn from(l: crate::loader::Loaded) -> Self {
        Self {
            model: AnyModel::BlackMamba(Box::new(l.model)),
            tokenizer: l.tokenizer,
            label: l.label,
            untrained: l.untrained,
            load_secs: l.load_secs,
            notes: l.notes,
            eos: vec![crate::tokenizer::EOS_ID],
        }
    }
}

/// The transformer family of a model folder, from `config.json`'s `model_type`: `None` for a
/// BlackMamba folder (no `model_type`, or one naming Mamba). Another `model_type` is an error
/// naming it and the supported ones.
pub fn family_of(dir: &Path) -> Result<Option<Family>> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None); // the BlackMamba loader reports the missing or unreadable file
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    match v.get("model_type").and_then(|t| t.as_str()) {
        None => Ok(None),
        Some("olmoe") => Ok(Some(Family::Olmoe)),
        Some("mixtral") => Ok(Some(Family::Mixtral)),
        Some(t) if t.to_ascii_lowercase().contains("mamba") => Ok(None),
        Some(t) => Err(Error::bad_file(
            &path,
            format!("model_type '{t}' is not supported; --model takes BlackMamba, 'olmoe' or 'mixtral' checkpoints"),
        )),
    }
}

/// Whether `source` is a transformer checkpoint folder.
pub fn is_transformer(source: &ModelSource) -> Result<bool> {
    match source {
        ModelSource::Dir(dir) => Ok(family_of(dir)?.is_some()),
        _ => Ok(false),
    }
}

/// Loads a model of either family: a folder whose `config.json` names `olmoe` or `mixtral` as a
/// transformer (with the folder's `tokenizer.json` or `opts.tokenizer`), anything else through
/// [`crate::loader::load`].
pub fn load_any(source: &ModelSource, device: &Device, dtype: DType, opts: &LoadOpts) -> Result<AnyLoaded> {
    let ModelSource::Dir(dir) = source else {
        return crate::loader::load(source, device, dtype, opts).map(AnyLoaded::from);
    };
    if family_of(dir)?.is_none() {
        return crate::loader::load(source, device, dtype, opts).map(AnyLoaded::from);
    }
    let t0 = Instant::now();
    let tok_path = match &opts.tokenizer {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("tokenizer.json");
            if !p.is_file() {
                return Err(Error::bad_file(
                    dir,
                    "no tokenizer.json in this transformer checkpoint folder; copy the model's tokenizer.json there or pass --tokenizer FILE",
                ));
            }
            p
        }
    };
    let tokenizer = crate::tokenizer::from_file(&tok_path)?;
    if let Some(p) = &opts.progress {
        p(&crate::loader::LoadProgress {
            stage: "read".into(),
            done: 0,
            total: 1,
        });
    }
    let model = MoeLm::load(dir, device, dtype)?;
    crate::tokenizer::check_fits(&tokenizer, model.config().vocab_size, &format!("tokenizer {}", tok_path.display()))?;
    if let Some(p) = &opts.progress {
        p(&crate::loader::LoadProgress {
            stage: "ready".into(),
            done: 1,
            total: 1,
        });
    }
    Ok(AnyLoaded {
        model: AnyModel::Transformer(Box::new(model)),
        tokenizer,
        label: source.label(),
        untrained: false,
        load_secs: t0.elapsed().as_secs_f64(),
        notes: Vec::new(),
        eos: text::eos_ids(dir),
    })
}
