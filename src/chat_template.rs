//! The chat template shared by the TUI, the fine-tuning data loader and the embedded model.
//!
//! BlackMamba is a base model with no template of its own, so ours is plain text that any
//! tokenizer handles:
//!
//! ```text
//! System: {system}\n            (optional, first)
//! User: {user}\n
//! Assistant: {assistant}<eos>\n
//! User: ...
//! ```
//!
//! `<eos>` is the end-of-text id (0), inserted as an id, never as text. A generation prompt ends
//! with `Assistant:`; the model answers with ` {text}` and stops at `<eos>` (or at the stop string
//! `\nUser:` for models that never learned the template). Fine-tuning puts the loss on the
//! assistant's ` {text}<eos>` only.

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::tokenizer::{encode, EOS_ID};

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Self::System => "System",
            Self::User => "User",
            Self::Assistant => "Assistant",
        }
    }

    /// Parses the `role` of a JSONL message.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "system" => Ok(Self::System),
            "user" | "human" => Ok(Self::User),
            "assistant" | "bot" | "gpt" => Ok(Self::Assistant),
            other => Err(Error::Invalid(format!("unknown role '{other}'; use system, user or assistant"))),
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// Stop strings for generation with this template.
pub const STOP_STRINGS: &[&str] = &["\nUser:"];

/// Token ids of a conversation and, per id, whether the loss applies (assistant text + eos).
pub fn render(tok: &Tokenizer, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for m in messages {
        let head = encode(tok, &format!("{}:", m.role.label()))?;
        mask.extend(std::iter::repeat_n(false, head.len()));
        ids.extend(head);
        let body = encode(tok, &format!(" {}", m.content.trim()))?;
        let learn = m.role == Role::Assistant;
        mask.extend(std::iter::repeat_n(learn, body.len()));
        ids.extend(body);
        if learn {
            ids.push(EOS_ID);
            mask.push(true);
        }
        let nl = encode(tok, "\n")?;
        mask.extend(std::iter::repeat_n(false, nl.len()));
        ids.extend(nl);
    }
    Ok((ids, mask))
}

/// The ids to feed before generating the next assistant message: the new user message (and,
/// on the first turn, any system message) followed by `Assistant:`. `first_turn` adds nothing
/// else; later turns assume the state already holds the previous exchange.
pub fn prompt_for_turn(tok: &Tokenizer, system: Option<&str>, user: &str, first_turn: bool) -> Result<Vec<u32>> {
    let mut text = String::new();
    if first_turn {
        if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
            text.push_str(&format!("System: {}\n", s.trim()));
        }
    }
    text.push_str(&format!("User: {}\nAssistant:", user.trim()));
    encode(tok, &text)
}

/// The ids that close an assistant message after generation stopped (eos + newline), so that
/// the state is ready for the next `User:` line.
pub fn close_turn(tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = vec![EOS_ID];
    ids.extend(encode(tok, "\n")?);
    Ok(ids)
}
