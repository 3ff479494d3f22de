//! Fine-tuning data: JSONL lines (chat, prompt/response, text) and plain text.
#![no_main]

use std::sync::OnceLock;

static TOKENIZER: OnceLock<Option<tokenizers::Tokenizer>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(tok) = TOKENIZER.get_or_init(|| blackmamba::tokenizer::neox().ok()) else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = blackmamba::finetune::data::jsonl_examples(text, tok, 32);
        let _ = blackmamba::finetune::data::text_examples(text, tok, 32);
    }
});
