//! Long inputs without loading them whole: a text file is read in blocks cut where byte-level BPE
//! cannot merge across the cut, tokenised block by block, and fed to the model in chunks that
//! carry the recurrent state (a Mamba forward continues from its state, so chunking is exact).

use std::io::BufRead;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::{Logits, Model};

/// Text blocks of roughly `block_bytes` each. A block ends after a line `…x\n` (x not
/// whitespace; for `…x\r\n` between the `\r` and the `\n`) when the next line starts with a
/// non-whitespace character: the GPT-2/NeoX
/// pre-tokenizer splits there anyway, so tokenising the blocks one by one gives the same ids as
/// tokenising the whole text. If no such cut shows up within 16 blocks' worth of text (and 64 KiB),
/// the block is cut at the next line end anyway (ids may then differ at that one cut).
pub struct TextBlocks<R> {
    reader: R,
    name: String,
    block_bytes: usize,
    /// Text waiting to be emitted.
    buf: String,
    /// The line read ahead.
    next: Option<String>,
    done: bool,
}

impl<R: BufRead> TextBlocks<R> {
    /// `name` names the input in errors.
    pub fn new(reader: R, name: &str, block_bytes: usize) -> Self {
        Self {
            reader,
            name: name.to_string(),
            block_bytes: block_bytes.max(1),
            buf: String::new(),
            next: None,
            done: false,
        }
    }

    fn read_line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(Error::Invalid(format!("{}: not UTF-8 text; give a UTF-8 text file", self.name)))
            }
            Err(e) => Err(Error::io(&self.name, e)),
        }
    }
}

/// Where a cut between `prev` (a whole line) and `next` keeps the tokenisation unchanged: the
/// number of bytes at the end of `prev` that must move to the next block (0 after `x\n`, 1 to cut
/// `x\r\n` between `\r` and `\n`), or `None`.
fn safe_cut(prev: &str, next: &str) -> Option<usize> {
    let next_ok = next.chars().next().is_some_and(|c| !c.is_whitespace());
    let ends_word = |body: &str| body.chars().next_back().is_some_and(|c| !c.is_whitespace());
    if !next_ok {
        None
    } else if prev.strip_suffix("\r\n").is_some_and(ends_word) {
        Some(1)
    } else if prev.strip_suffix('\n').is_some_and(ends_word) {
        Some(0)
    } else {
        None
    }
}

impl<R: BufRead> Iterator for TextBlocks<R> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        if self.done {
            return None;
        }
        let mut last_line_end = self.buf.len();
        loop {
            let line = match self.next.take() {
                Some(l) => Some(l),
                None => match self.read_line() {
                    Ok(l) => l,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            };
            let Some(line) = line else {
                self.done = true;
                return (!self.buf.is_empty()).then(|| Ok(std::mem::take(&mut self.buf)));
            };
            if self.buf.len() >= self.block_bytes {
                let prev = &self.buf[last_line_end..];
                let forced = self.buf.len() >= (16 * self.block_bytes).max(1 << 16);
                let cut = safe_cut(prev, &line).or(forced.then_some(0));
                if let Some(carry) = cut {
                    let mut tail = self.buf.split_off(self.buf.len() - carry);
                    tail.push_str(&line);
                    self.next = Some(tail);
                    return Some(Ok(std::mem::take(&mut self.buf)));
                }
            }
            last_line_end = self.buf.len();
            self.buf.push_str(&line);
        }
    }
}

/// Opens a text file as blocks.
pub fn file_blocks(path: &Path, block_bytes: usize) -> Result<TextBlocks<std::io::BufReader<std::fs::File>>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(TextBlocks::new(
        std::io::BufReader::new(f),
        &path.display().to_string(),
        block_bytes,
    ))
}

/// How the ids are fed to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOpts {
    /// Tokens per forward call.
    pub chunk: usize,
    /// Start a fresh state every this many tokens (0 = one sequence for the whole input).
    pub reset_every: usize,
    /// Stop after this many tokens (0 = all).
    pub max_tokens: usize,
}

impl Default for StreamOpts {
    fn default() -> Self {
        Self {
            chunk: 512,
            reset_every: 0,
            max_tokens: 0,
        }
    }
}

/// One forward call's worth of tokens and what the probe recorded for them.
pub struct Chunk<'a> {
    /// Position of the first token in the whole input.
    pub start: usize,
    pub ids: &'a [u32],
    pub probe: &'a Probe,
}

/// Feeds ids to the model in chunks, carrying the state, and hands each chunk's probe on.
pub struct Streamer<'m> {
    model: &'m Model,
    opts: StreamOpts,
    state: State,
    pending: Vec<u32>,
    /// Tokens already run.
    pos: usize,
    /// Tokens run since the last reset.
    seq_pos: usize,
}

impl<'m> Streamer<'m> {
    pub fn new(model: &'m Model, opts: StreamOpts) -> Result<Self> {
        if opts.chunk == 0 {
            return Err(Error::Invalid("--chunk 0: give at least 1 token per forward call".into()));
        }
        Ok(Self {
            model,
            opts,
            state: model.new_state(1)?,
            pending: Vec::new(),
            pos: 0,
            seq_pos: 0,
        })
    }

    /// Tokens taken so far (run or pending).
    pub fn taken(&self) -> usize {
        self.pos + self.pending.len()
    }

    /// Whether `max_tokens` is reached.
    pub fn full(&self) -> bool {
        self.opts.max_tokens > 0 && self.taken() >= self.opts.max_tokens
    }

    /// Adds ids (beyond `max_tokens` they are dropped) and runs every full chunk.
    pub fn push(&mut self, ids: &[u32], f: &mut dyn FnMut(Chunk<'_>) -> Result<()>) -> Result<()> {
        let room = if self.opts.max_tokens > 0 {
            self.opts.max_tokens.saturating_sub(self.taken())
        } else {
            usize::MAX
        };
        let ids = &ids[..ids.len().min(room)];
        self.model.check_ids(ids)?;
        self.pending.extend_from_slice(ids);
        while self.pending.len() >= self.next_len() {
            self.run_one(f)?;
        }
        Ok(())
    }

    /// Runs what is left. Returns the number of tokens run in all.
    pub fn finish(mut self, f: &mut dyn FnMut(Chunk<'_>) -> Result<()>) -> Result<usize> {
        while !self.pending.is_empty() {
            self.run_one(f)?;
        }
        Ok(self.pos)
    }

    /// Length of the next forward call: a chunk, cut short at a reset boundary.
    fn next_len(&self) -> usize {
        match self.opts.reset_every {
            0 => self.opts.chunk,
            r => self.opts.chunk.min(r - self.seq_pos),
        }
    }

    fn run_one(&mut self, f: &mut dyn FnMut(Chunk<'_>) -> Result<()>) -> Result<()> {
        let n = self.next_len().min(self.pending.len());
        let ids: Vec<u32> = self.pending.drain(..n).collect();
        let t = candle_core::Tensor::from_slice(&ids, (1, n), &self.model.device)?;
        let mut probe = Probe::new();
        self.model.forward(&t, &mut self.state, Logits::Last, Some(&mut probe))?;
        f(Chunk {
            start: self.pos,
            ids: &ids,
            probe: &probe,
        })?;
        self.pos += n;
        self.seq_pos += n;
        if self.opts.reset_every > 0 && self.seq_pos >= self.opts.reset_every {
            self.state = self.model.new_state(1)?;
            self.seq_pos = 0;
        }
        Ok(())
    }
}

/// Where the text comes from.
#[derive(Debug, Clone)]
pub enum Input {
    Prompt(String),
    File(std::path::PathBuf),
    /// Standard input (`-`), read in blocks as a file is.
    Stdin,
}

impl Input {
    /// Picks `--prompt` or `--input`; exactly one must be given.
    pub fn from_args(prompt: Option<&str>, file: Option<&Path>) -> Result<Self> {
        match (prompt, file) {
            (Some(p), None) => Ok(Self::Prompt(p.to_string())),
            (None, Some(f)) if f.as_os_str() == "-" => Ok(Self::Stdin),
            (None, Some(f)) => Ok(Self::File(f.to_path_buf())),
            _ => Err(Error::Invalid("give the text with either --prompt TEXT or --input FILE".into())),
        }
    }

    /// A short name for reports.
    pub fn label(&self) -> String {
        match self {
            Self::Prompt(p) => format!("--prompt ({} bytes)", p.len()),
            Self::File(f) => f.display().to_string(),
            Self::Stdin => "standard input".into(),
        }
    }
}

fn push_blocks<R: BufRead>(
    s: &mut Streamer<'_>,
    tok: &Tokenizer,
    blocks: TextBlocks<R>,
    f: &mut dyn FnMut(Chunk<'_>) -> Result<()>,
) -> Result<()> {
    for block in blocks {
        s.push(&crate::tokenizer::encode(tok, &block?)?, f)?;
        if s.full() {
            break;
        }
    }
    Ok(())
}

/// Tokenises the input block by block and streams it through the model; returns tokens run.
pub fn run_input(
    model: &Model,
    tok: &Tokenizer,
    input: &Input,
    opts: StreamOpts,
    f: &mut dyn FnMut(Chunk<'_>) -> Result<()>,
) -> Result<usize> {
    let mut s = Streamer::new(model, opts)?;
    match input {
        Input::Prompt(p) => s.push(&crate::tokenizer::encode(tok, p)?, f)?,
        Input::File(path) => push_blocks(&mut s, tok, file_blocks(path, 1 << 16)?, f)?,
        Input::Stdin => push_blocks(&mut s, tok, TextBlocks::new(std::io::stdin().lock(), "standard input", 1 << 16), f)?,
    }
    if s.taken() == 0 {
        return Err(Error::Invalid(format!("{}: no tokens to analyse (empty text)", input.label())));
    }
    s.finish(f)
}

/// The token ids of the whole input (tokenised block by block, as [`run_input`] does), at most
/// `max_tokens` of them (0 = all): for a model whose runs are not streamed (a transformer).
pub fn input_ids(tok: &Tokenizer, input: &Input, max_tokens: usize) -> Result<Vec<u32>> {
    let cap = if max_tokens == 0 { usize::MAX } else { max_tokens };
    let mut ids = Vec::new();
    let mut take = |block: &str| -> Result<bool> {
        ids.extend(crate::tokenizer::encode(tok, block)?);
        Ok(ids.len() >= cap)
    };
    match input {
        Input::Prompt(p) => {
            take(p)?;
        }
        Input::File(path) => {
            for b in file_blocks(path, 1 << 16)? {
                if take(&b?)? {
                    break;
                }
            }
        }
        Input::Stdin => {
            for b in TextBlocks::new(std::io::stdin().lock(), "standard input", 1 << 16) {
                if take(&b?)? {
                    break;
                }
            }
        }
    }
    ids.truncate(cap);
    if ids.is_empty() {
        return Err(Error::Invalid(format!("{}: no tokens to analyse (empty text)", input.label())));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blocks_rejoin_to_the_text_and_cut_only_at_safe_lines() {
        let text = "alpha beta\n  indented line\nplain\n\n\nafter blanks\nx\ny \nz\nlast no newline";
        for bytes in [1, 3, 10, 1000] {
            let blocks: Vec<String> = TextBlocks::new(text.as_bytes(), "t", bytes).map(|b| b.unwrap()).collect();
            assert_eq!(blocks.concat(), text, "block size {bytes}");
            for w in blocks.windows(2) {
                let prev_line = w[0].lines().last().unwrap();
                assert!(w[0].ends_with('\n') && !prev_line.ends_with(char::is_whitespace), "{w:?}");
                assert!(!w[1].starts_with(char::is_whitespace), "{w:?}");
            }
        }
    }

    #[test]
    fn block_tokenisation_matches_whole_text() {
        let tok = crate::tokenizer::neox().unwrap();
        let lf = "The cat sat.\n  Indented code();\nNext line\n\n\nAfter blanks   spaced\n(paren)\n42 is a number\n\tTab\nend";
        let crlf = lf.replace('\n', "\r\n");
        for (text, bytes) in [lf, crlf.as_str()].into_iter().flat_map(|t| [1, 8, 30].map(|b| (t, b))) {
            let whole = crate::tokenizer::encode(&tok, text).unwrap();
            let n_blocks = TextBlocks::new(text.as_bytes(), "t", bytes).count();
            assert!(bytes > 8 || n_blocks > 3, "the text is cut ({n_blocks} blocks of {bytes})");
            let mut ids = Vec::new();
            for b in TextBlocks::new(text.as_bytes(), "t", bytes) {
                ids.extend(crate::tokenizer::encode(&tok, &b.unwrap()).unwrap());
            }
            assert_eq!(ids, whole, "block size {bytes}, {text:?}");
        }
    }

    #[test]
    fn text_without_safe_cuts_is_still_cut_in_bounded_blocks() {
        let text = "  indented\n".repeat(20_000); // 220 kB, every line starts with spaces
        let blocks: Vec<String> = TextBlocks::new(text.as_bytes(), "t", 1000).map(|b| b.unwrap()).collect();
        assert!(blocks.len() >= 3, "{} blocks", blocks.len());
        assert!(blocks.iter().all(|b| b.len() <= (1 << 16) + 11));
        assert_eq!(blocks.concat(), text);
    }

    #[test]
    fn non_utf8_is_a_clear_error() {
        let bytes: &[u8] = b"ok\n\xff\xfe\n";
        let err = TextBlocks::new(bytes, "in.txt", 1).find_map(|b| b.err()).unwrap();
        assert!(err.to_string().contains("in.txt: not UTF-8"), "{err}");
    }
}
