//! Preference data for DPO/IPO: JSONL, one pair a line, in either form
//!
//! * `{"prompt": "...", "chosen": "...", "rejected": "...", "system": "..."?}`
//! * `{"prompt": [messages]?, "chosen": [messages], "rejected": [messages]}` (the conversational
//!   form: the last message of each side is the assistant's answer, what comes before it the
//!   prompt, which must be the same on both sides)
//!
//! Each side is rendered with the chat template ([`crate::chat_template::render`]); the response
//! mask covers the final assistant message (its text and end-of-text), whose summed log-prob the
//! loss uses. [`parse`] reports the lines it cannot use with their number and reason; [`load`]
//! (what a run reads) stops at the first one.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat_template::{render, Message, Role};
use crate::error::{Error, Result};
use crate::finetune::data::{BadLine, Example};

/// One preference pair, tokenised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefPair {
    /// The preferred response after the prompt (mask on the response).
    pub chosen: Example,
    /// The other response after the same prompt.
    pub rejected: Example,
}

/// A loaded preference file.
#[derive(Debug, Clone)]
pub struct PrefSet {
    pub pairs: Vec<PrefPair>,
    /// Lines that could not be used ([`load`] makes the first one an error).
    pub bad: Vec<BadLine>,
    /// sha256 of the text, hex.
    pub hash: String,
}

/// What a preference line looks like: the fix named by every error about one.
pub const LINE_FORMS: &str = "each line is {\"prompt\": \"...\", \"chosen\": \"...\", \"rejected\": \"...\"} or the same with lists of {\"role\", \"content\"} messages";

/// Reads a preference JSONL file; sequences longer than `seq_len + 1` tokens are cut. Unlike
/// fine-tuning data, a preference file is used whole or not at all: the first unusable line is
/// an error that names the file, the line, what is wrong and the forms a line may take.
pub fn load(path: &Path, tok: &Tokenizer, seq_len: usize) -> Result<PrefSet> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::bad_file(path, format!("not UTF-8 text ({e}); save it as UTF-8 JSONL")))?;
    let set = parse(&text, tok, seq_len)?;
    if let Some(b) = set.bad.first() {
        // a reason that names its own fix (--seq-len) needs no reminder of the line forms
        let fix = if b.reason.contains("--") {
            String::new()
        } else {
            format!("; {LINE_FORMS}")
        };
        return Err(Error::bad_file(path, format!("line {}: {}{fix}", b.line, b.reason)));
    }
    if set.pairs.is_empty() {
        return Err(Error::bad_file(
            path,
            format!("no preference pair: the file is empty; {LINE_FORMS}"),
        ));
    }
    Ok(set)
}

/// The sha256 of a preference file as [`parse`]d (hex): what a resumed run checks.
pub fn hash(text: &str) -> String {
    crate::finetune::data::sha256_hex(text.as_bytes())
}

/// Parses preference JSONL text (blank lines ignored).
pub fn parse(text: &str, tok: &Tokenizer, seq_len: usize) -> Result<PrefSet> {
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match pair(line, tok, seq_len) {
            Ok(Ok(p)) => pairs.push(p),
            Ok(Err(reason)) => bad.push(BadLine { line: i + 1, reason }),
            Err(e) => return Err(e),
        }
    }
    Ok(PrefSet {
        pairs,
        bad,
        hash: hash(text),
    })
}

/// A line -> a pair, or the reason it is unusable (outer error: the tokenizer failed).
fn pair(line: &str, tok: &Tokenizer, seq_len: usize) -> Result<std::result::Result<PrefPair, String>> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("not JSON ({e})"))),
    };
    let sides = match conversation(&v) {
        Ok(s) => s,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut out = Vec::with_capacity(2);
    for (prompt, answer) in sides {
        let (prefix, _) = render(tok, &prompt)?;
        let mut all = prompt;
        all.push(answer);
        let (ids, mut mask) = render(tok, &all)?;
        mask.iter_mut().take(prefix.len()).for_each(|m| *m = false);
        let keep = ids.len().min(seq_len + 1);
        let ex = Example {
            ids: ids[..keep].to_vec(),
            mask: mask[..keep].to_vec(),
        };
        if ex.n_targets() == 0 {
            return Ok(Err(format!(
                "the response starts past the first {} tokens; raise --seq-len",
                seq_len + 1
            )));
        }
        out.push(ex);
    }
    let rejected = out.pop();
    let chosen = out.pop();
    match (chosen, rejected) {
        (Some(chosen), Some(rejected)) => Ok(Ok(PrefPair { chosen, rejected })),
        _ => Ok(Err("expected a chosen and a rejected side".into())),
    }
}

/// (prompt messages, answer) of the chosen and the rejected side.
fn conversation(v: &Value) -> std::result::Result<[(Vec<Message>, Message); 2], String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let get = |k: &str| obj.get(k).ok_or(format!("missing \"{k}\""));
    let (chosen, rejected) = (get("chosen")?, get("rejected")?);
    let prompt = obj.get("prompt");
    if let (Some(c), Some(r)) = (chosen.as_str(), rejected.as_str()) {
        let p = prompt
            .and_then(Value::as_str)
            .ok_or("\"prompt\" must be a string when \"chosen\" and \"rejected\" are")?;
        let mut msgs = Vec::new();
        if let Some(s) = obj.get("system").and_then(Value::as_str).filter(|s| !s.trim().is_empty()) {
            msgs.push(msg(Role::System, s));
        }
        msgs.push(msg(Role::User, p));
        for (k, t) in [("chosen", c), ("rejected", r)] {
            if t.trim().is_empty() {
                return Err(format!("\"{k}\" is empty"));
            }
        }
        return Ok([(msgs.clone(), msg(Role::Assistant, c)), (msgs, msg(Role::Assistant, r))]);
    }
    let base = match prompt {
        Some(p) => messages(p, "prompt")?,
        None => Vec::new(),
    };
    let side = |v: &Value, k: &str| -> std::result::Result<(Vec<Message>, Message), String> {
        let mut m = base.clone();
        m.extend(messages(v, k)?);
        let last = m.pop().ok_or(format!("\"{k}\" has no messages"))?;
        if last.role != Role::Assistant || last.content.trim().is_empty() {
            return Err(format!("\"{k}\" must end with an assistant message with text"));
        }
        Ok((m, last))
    };
    let (c, r) = (side(chosen, "chosen")?, side(rejected, "rejected")?);
    if c.0 != r.0 {
        return Err("\"chosen\" and \"rejected\" differ before their last message; the prompt must be the same".into());
    }
    Ok([c, r])
}

fn msg(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

fn messages(v: &Value, key: &str) -> std::result::Result<Vec<Message>, String> {
    let arr = v.as_array().ok_or(format!("\"{key}\" must be a string or a list of messages"))?;
    arr.iter()
        .enumerate()
        .map(|(k, m)| {
            let field = |f: &str| {
                m.get(f)
                    .and_then(Value::as_str)
                    .ok_or(format!("{key} message {k} has no string \"{f}\""))
            };
            let role = Role::parse(field("role")?).map_err(|e| format!("{key} message {k}: {e}"))?;
            Ok(msg(role, field("content")?))
        })
        .collect()
}
