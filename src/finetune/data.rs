//! Training data -> token examples with a loss mask, and the batches the trainer draws from them.
//!
//! * Plain text: tokenized, concatenated and cut into windows of `seq_len + 1` tokens (each
//!   window overlaps the next by one token, so every token is a target exactly once); loss on all.
//! * JSONL, one example per line, any of
//!   `{"prompt": "...", "response": "...", "system": "..."?}`,
//!   `{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}` or
//!   `{"text": "..."}`; conversations are rendered with [`crate::chat_template::render`] and the
//!   loss is on the assistant tokens only (`text` lines: on every token). Lines that cannot be
//!   used are skipped and reported with their number and the reason; blank lines are ignored.
//!
//! Files are streamed (see [`crate::finetune::data_stream`]): memory holds the token ids and
//! one piece of text (or one line) at a time, whatever the file's size or line length.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::chat_template::{render, Message, Role};
use crate::error::{Error, Result};
use crate::finetune::data_stream::{read_line, Hashing, Line, TextPieces, MAX_LINE_BYTES};
use crate::rng::Rng;
use crate::tokenizer::{encode, EOS_ID};

/// How a data file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// By extension: `.jsonl` / `.json` are JSONL, anything else plain text.
    #[default]
    Auto,
    Text,
    Jsonl,
}

impl DataFormat {
    /// Parses `--format`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "text" | "txt" => Ok(Self::Text),
            "jsonl" | "json" => Ok(Self::Jsonl),
            other => Err(Error::Invalid(format!("--format {other}: use text or jsonl"))),
        }
    }

    /// The concrete format of `path`.
    pub fn resolve(self, path: &Path) -> Self {
        match self {
            Self::Auto => match path.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "json") => Self::Jsonl,
                _ => Self::Text,
            },
            other => other,
        }
    }
}

/// One training sequence: `ids[t]` is predicted from `ids[..t]` where `mask[t]` (`mask[0]` unused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Example {
    /// Target tokens that carry loss.
    pub fn n_targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// A line that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    pub reason: String,
}

/// A loaded data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub bad: Vec<BadLine>,
    /// sha256 of the file's bytes, hex.
    pub hash: String,
}

/// The sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and tokenizes a data file. Examples longer than `seq_len + 1` tokens are cut; ids must
/// be below `vocab`. A file with no usable example is an error that quotes the first bad lines.
pub fn load(path: &Path, format: DataFormat, tok: &Tokenizer, seq_len: usize, vocab: usize) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = Hashing::new(file);
    let name = path.display().to_string();
    let (examples, bad, reader) = match format.resolve(path) {
        DataFormat::Jsonl => {
            let mut r = std::io::BufReader::new(reader);
            let (examples, bad) = jsonl_stream(&mut r, &name, tok, seq_len)?;
            (examples, bad, r.into_inner())
        }
        _ => {
            let mut pieces = TextPieces::new(reader, &name);
            let examples = text_stream(&mut pieces, tok, seq_len)?;
            (examples, vec![], pieces.into_inner())
        }
    };
    let hash = reader.finish().map_err(|e| Error::io(path, e))?;
    for ex in &examples {
        if let Some(&id) = ex.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::bad_file(
                path,
                format!("token id {id} is outside the model's vocabulary of {vocab}; use the model's own tokenizer"),
            ));
        }
    }
    if examples.is_empty() {
        let first: Vec<String> = bad.iter().take(3).map(|b| format!("line {}: {}", b.line, b.reason)).collect();
        let why = if first.is_empty() {
            "it holds no text".to_string()
        } else {
            format!("{} bad line(s), e.g. {}", bad.len(), first.join("; "))
        };
        return Err(Error::bad_file(path, format!("no usable training example: {why}")));
    }
    Ok(Dataset { examples, bad, hash })
}

/// Plain text -> windows of `seq_len + 1` tokens.
pub fn text_examples(text: &str, tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    text_stream(&mut TextPieces::new(text.as_bytes(), "text"), tok, seq_len)
}

/// Text pieces -> windows of `seq_len + 1` tokens, each overlapping the next by one token, built
/// as the ids come (the ids are held once, in the windows).
fn text_stream<R: Read>(pieces: &mut TextPieces<R>, tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let mut pending: Vec<u32> = Vec::new();
    while let Some(piece) = pieces.next_piece()? {
        pending.extend(encode(tok, &piece)?);
        let mut start = 0;
        while pending.len() - start >= seq_len + 2 {
            out.push(window(&pending[start..start + seq_len + 1]));
            start += seq_len;
        }
        pending.drain(..start);
    }
    // the rest: one full window and/or a last short one (of at least two tokens)
    let mut start = 0;
    while start + 1 < pending.len() {
        let end = (start + seq_len + 1).min(pending.len());
        out.push(window(&pending[start..end]));
        start += seq_len;
    }
    Ok(out)
}

fn window(ids: &[u32]) -> Example {
    Example {
        ids: ids.to_vec(),
        mask: vec![true; ids.len()],
    }
}

/// JSONL -> one example per usable line, plus the skipped lines.
pub fn jsonl_examples(text: &str, tok: &Tokenizer, seq_len: usize) -> Result<(Vec<Example>, Vec<BadLine>)> {
    jsonl_stream(&mut text.as_bytes(), "text", tok, seq_len)
}

/// JSONL read line by line (each line at most [`MAX_LINE_BYTES`]); lines are numbered from 1.
fn jsonl_stream<R: std::io::BufRead>(r: &mut R, name: &str, tok: &Tokenizer, seq_len: usize) -> Result<(Vec<Example>, Vec<BadLine>)> {
    let mut examples = Vec::new();
    let mut bad = Vec::new();
    let mut n = 0;
    while let Some(line) = read_line(r, name, MAX_LINE_BYTES)? {
        n += 1;
        let line = match line {
            Line::Text(t) => t,
            Line::Bad(reason) => {
                bad.push(BadLine { line: n, reason });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match jsonl_line(&line, tok, seq_len) {
            Ok(ex) => examples.push(ex),
            Err(LineError::Bad(reason)) => bad.push(BadLine { line: n, reason }),
            Err(LineError::Fatal(e)) => return Err(e),
        }
    }
    Ok((examples, bad))
}

enum LineError {
    /// The line is unusable: skip it and say why.
    Bad(String),
    /// Something else failed (the tokenizer): stop.
    Fatal(Error),
}

impl From<Error> for LineError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(msg) => Self::Bad(msg),
            other => Self::Fatal(other),
        }
    }
}

fn jsonl_line(line: &str, tok: &Tokenizer, seq_len: usize) -> std::result::Result<Example, LineError> {
    let bad = |s: &str| LineError::Bad(s.to_string());
    let v: Value = serde_json::from_str(line).map_err(|e| LineError::Bad(format!("not valid JSON ({e})")))?;
    let obj = v.as_object().ok_or_else(|| bad("expected a JSON object"))?;
    let str_field = |key: &str| -> std::result::Result<Option<String>, LineError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(LineError::Bad(format!("\"{key}\" must be a string"))),
        }
    };
    let (ids, mask) = if let Some(msgs) = obj.get("messages") {
        let arr = msgs.as_array().ok_or_else(|| bad("\"messages\" must be an array"))?;
        let mut messages = Vec::with_capacity(arr.len());
        for (k, m) in arr.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| LineError::Bad(format!("message {k} has no string \"role\"")))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| LineError::Bad(format!("message {k} has no string \"content\"")))?;
            let role = Role::parse(role).map_err(|e| LineError::Bad(format!("message {k}: {e}")))?;
            messages.push(Message {
                role,
                content: content.to_string(),
            });
        }
        if !messages.iter().any(|m| m.role == Role::Assistant && !m.content.trim().is_empty()) {
            return Err(bad("no assistant message with text to learn from"));
        }
        render(tok, &messages)?
    } else if obj.contains_key("prompt") || obj.contains_key("response") {
        let prompt = str_field("prompt")?.ok_or_else(|| bad("has \"response\" but no \"prompt\""))?;
        let response = str_field("response")?.ok_or_else(|| bad("has \"prompt\" but no \"response\""))?;
        if response.trim().is_empty() {
            return Err(bad("\"response\" is empty"));
        }
        let mut messages = Vec::new();
        if let Some(s) = str_field("system")?.filter(|s| !s.trim().is_empty()) {
            messages.push(Message {
                role: Role::System,
                content: s,
            });
        }
        messages.push(Message {
            role: Role::User,
            content: prompt,
        });
        messages.push(Message {
            role: Role::Assistant,
            content: response,
        });
        render(tok, &messages)?
    } else if let Some(text) = str_field("text")? {
        let mut ids = encode(tok, &text)?;
        ids.push(EOS_ID);
        let n = ids.len();
        (ids, vec![true; n])
    } else {
        return Err(bad("expected {\"prompt\", \"response\"}, {\"messages\": [...]} or {\"text\"}"));
    };
    let keep = ids.len().min(seq_len + 1);
    let ex = Example {
        ids: ids[..keep].to_vec(),
        mask: mask[..keep].to_vec(),
    };
    if ex.n_targets() == 0 {
        return Err(LineError::Bad(format!(
            "no learnable token within the first {} tokens; raise --seq-len",
            seq_len + 1
        )));
    }
    Ok(ex)
}

/// Splits off a held-out set: `fraction` of the examples (at least one, when there are at least
/// two), chosen by `seed`. Returns (train, held out).
pub fn split<T>(examples: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = examples.len();
    if fraction <= 0.0 || n < 2 {
        return (examples, vec![]);
    }
    let n_eval = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let order = permutation(n, seed ^ 0x5EED_E7A1);
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (ex, e) in examples.into_iter().zip(is_eval) {
        if e {
            eval.push(ex);
        } else {
            train.push(ex);
        }
    }
    (train, eval)
}

/// A Fisher–Yates permutation of 0..n.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

/// Where the trainer is in its data: epoch and position in that epoch's order. Each epoch has its
/// own shuffle from (seed, epoch), so this pair is all a resume needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    pub epoch: u64,
    pub pos: usize,
}

/// Draws micro-batches of example indices, epoch after epoch.
#[derive(Debug, Clone)]
pub struct Batcher {
    n: usize,
    seed: u64,
    pub cursor: DataCursor,
    order: Vec<usize>,
}

impl Batcher {
    pub fn new(n: usize, seed: u64, cursor: DataCursor) -> Self {
        let order = permutation(n, Self::epoch_seed(seed, cursor.epoch));
        Self { n, seed, cursor, order }
    }

    fn epoch_seed(seed: u64, epoch: u64) -> u64 {
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }

    /// The next `b` example indices (crossing into the next epoch when needed).
    pub fn next(&mut self, b: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(b);
        while out.len() < b && self.n > 0 {
            if self.cursor.pos >= self.n {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    pos: 0,
                };
                self.order = permutation(self.n, Self::epoch_seed(self.seed, self.cursor.epoch));
            }
            out.push(self.order[self.cursor.pos]);
            self.cursor.pos += 1;
        }
        out
    }
}

/// A micro-batch as tensors: inputs padded to the longest example, and the flat positions that
/// carry loss with their target ids.
pub struct Batch {
    /// (B, L) u32 inputs, padded with EOS
    pub ids: Tensor,
    /// (n) u32 flat indices into the B·L positions whose next token is learned
    pub rows: Tensor,
    /// (n) u32 the target ids of those rows
    pub targets: Tensor,
    pub n_targets: usize,
    /// Input tokens that are not padding.
    pub n_inputs: usize,
}

impl Batch {
    /// Builds the tensors of `examples` on `device`.
    pub fn new(examples: &[&Example], device: &Device) -> Result<Self> {
        let bsz = examples.len();
        let len = examples.iter().map(|e| e.ids.len().saturating_sub(1)).max().unwrap_or(0).max(1);
        let mut ids = vec![EOS_ID; bsz * len];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        let mut n_inputs = 0;
        for (b, ex) in examples.iter().enumerate() {
            let n = ex.ids.len().saturating_sub(1);
            ids[b * len..b * len + n].copy_from_slice(&ex.ids[..n]);
            n_inputs += n;
            for t in 0..n {
                if ex.mask[t + 1] {
                    rows.push((b * len + t) as u32);
                    targets.push(ex.ids[t + 1]);
                }
            }
        }
        let n_targets = rows.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (bsz, len), device)?,
            rows: Tensor::from_vec(rows, n_targets, device)?,
            targets: Tensor::from_vec(targets, n_targets, device)?,
            n_targets,
            n_inputs,
        })
    }
}
