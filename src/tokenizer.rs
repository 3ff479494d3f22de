//! Tokenizers: a model folder's `tokenizer.json`, a file given by the user, or the embedded
//! GPT-NeoX-20B tokenizer the Zyphra checkpoints use (`assets/tokenizer.json`). Plus a streaming
//! decoder that only ever emits whole UTF-8 characters.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The GPT-NeoX-20B tokenizer (50,277 ids; id 0 `<|endoftext|>` is BOS/EOS).
pub const NEOX_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer.json");

/// The end-of-text id of GPT-NeoX and of our own tokenizers.
pub const EOS_ID: u32 = 0;

/// Loads a tokenizer from a file.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: not a tokenizers JSON file ({e})", path.display())))
}

/// The embedded GPT-NeoX-20B tokenizer.
pub fn neox() -> Result<Tokenizer> {
    Tokenizer::from_bytes(NEOX_TOKENIZER_JSON).map_err(|e| Error::Tokenizer(format!("embedded GPT-NeoX tokenizer: {e}")))
}

/// Encodes text without special tokens (the models take no BOS).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Decodes ids, keeping special tokens out.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Checks that every id the tokenizer can produce fits the model's vocabulary.
pub fn check_fits(tok: &Tokenizer, vocab: usize, what: &str) -> Result<()> {
    let n = tok.get_vocab_size(true);
    if n > vocab {
        return Err(Error::Tokenizer(format!(
            "{what} has {n} ids but the model's vocabulary has only {vocab}; use the tokenizer the model was trained with (--tokenizer FILE)"
        )));
    }
    Ok(())
}

/// Streams text out of a growing id sequence: each push returns the new complete characters.
/// Decoding the whole tail (not single ids) keeps byte-level merges and spaces right; text that
/// ends in an incomplete UTF-8 sequence (shown as U+FFFD) is held back until it completes.
#[derive(Debug, Default, Clone)]
pub struct TokenStream {
    ids: Vec<u32>,
    /// Ids before this index are already fully emitted.
    prev: usize,
    /// Ids from `prev` up to this index have emitted `emitted` bytes of their text.
    emitted: usize,
}

impl TokenStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = decode(tok, &self.ids[self.prev..])?;
        if text.len() > self.emitted && !text.ends_with('\u{FFFD}') {
            let new = text.get(self.emitted..).unwrap_or_default().to_string();
            // Restart the window now and then so decoding stays O(1) per token.
            if self.ids.len() - self.prev > 16 {
                self.prev = self.ids.len();
                self.emitted = 0;
            } else {
                self.emitted = text.len();
            }
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = decode(tok, &self.ids[self.prev..])?;
        self.prev = self.ids.len();
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = 0;
        Ok((!rest.is_empty()).then_some(rest))
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
