//! `blackmamba train-tokenizer`: a byte-level BPE trained on text files with the `tokenizers`
//! crate's trainer, laid out like GPT-NeoX's (id 0 `<|endoftext|>` = BOS/EOS, id 1 `<|padding|>`,
//! no prefix space), so the rest of the program treats it like the NeoX tokenizer. Used for the
//! embedded default model, whose small vocabulary keeps the embedding (and the file) small.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Text files to learn the merges from.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Pairs seen fewer times are never merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: &TrainTokenizerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.vocab_size >= 300,
        "--vocab-size {}: use at least 300 (256 bytes + specials + merges)",
        a.vocab_size
    );
    for p in &a.inputs {
        anyhow::ensure!(p.is_file(), "--input {}: no such file", p.display());
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(a.vocab_size)
        .min_frequency(a.min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true), AddedToken::from("<|padding|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
    let files = a.inputs.iter().map(|p| p.display().to_string()).collect();
    tok.train_from_files(&mut trainer, files)
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    crate::model::weights::write_atomic(&a.out, json.as_bytes()).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} ({} tokens)", a.out.display(), tok.get_vocab_size(true));
    Ok(())
}
