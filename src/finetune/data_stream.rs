//! Reading data files in bounded pieces, so that memory stays flat whatever the file's size or
//! line length: text is cut where byte-level BPE cannot merge across the cut, JSONL is read line
//! by line with a cap on the line length, and the file's sha256 is taken on the way.

use std::io::{BufRead, Read};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// About how many bytes of text are tokenized at a time.
pub const PIECE_BYTES: usize = 1 << 16;

/// If no exact cut shows up within this many bytes, the text is cut anyway at a character
/// boundary (ids may then differ from tokenizing the whole text at that one cut).
pub const MAX_PIECE_BYTES: usize = 1 << 20;

/// The longest JSONL line read; longer ones are skipped and reported (an example is cut to
/// `seq_len + 1` tokens anyway, far less than this).
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Hashing<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// Reads what is left (so the hash covers the whole input) and returns the sha256, hex.
    pub fn finish(mut self) -> std::io::Result<String> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok(self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Where `b[..i]` / `b[i..]` may be cut so that tokenizing both halves gives the ids of the whole
/// (the GPT-2/NeoX pre-tokenizer splits there anyway): after `x\n` before a non-space, or
/// before a single space between two non-spaces (`x| y`). Only ASCII bytes are looked at, so `i`
/// is a character boundary.
fn exact_cut(b: &[u8], i: usize) -> bool {
    let ws = |c: u8| c.is_ascii_whitespace();
    if i < 2 || i >= b.len() {
        return false;
    }
    if b[i - 1] == b'\n' {
        return !ws(b[i - 2]) && !ws(b[i]);
    }
    b[i] == b' ' && !ws(b[i - 1]) && b.get(i + 1).is_some_and(|&z| !ws(z))
}

/// Text pieces of about [`PIECE_BYTES`], read from `r` as needed, each valid UTF-8 and cut at an
/// exact cut (a token boundary of the pre-tokenizer: after `x\n` before a non-space, or before a
/// single space between non-spaces) where one exists within [`MAX_PIECE_BYTES`].
pub struct TextPieces<R> {
    reader: R,
    name: String,
    buf: Vec<u8>,
    /// Bytes of the input before `buf` (for error offsets).
    offset: usize,
    eof: bool,
}

impl<R: Read> TextPieces<R> {
    /// `name` names the input in errors.
    pub fn new(reader: R, name: &str) -> Self {
        Self {
            reader,
            name: name.to_string(),
            buf: Vec::new(),
            offset: 0,
            eof: false,
        }
    }

    /// Gives back the reader (to finish its hash).
    pub fn into_inner(self) -> R {
        self.reader
    }

    fn fill(&mut self, upto: usize) -> Result<()> {
        let mut chunk = [0u8; 1 << 14];
        while !self.eof && self.buf.len() < upto {
            match self.reader.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.name, e)),
            }
        }
        Ok(())
    }

    /// The next piece, or `None` at the end.
    pub fn next_piece(&mut self) -> Result<Option<String>> {
        self.fill(PIECE_BYTES)?;
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut cut = None;
        if !self.eof {
            // the last exact cut past half a piece, reading on (up to the cap) until there is one
            let mut from = PIECE_BYTES / 2;
            loop {
                cut = (from..self.buf.len()).rev().find(|&i| exact_cut(&self.buf, i));
                if cut.is_some() || self.eof || self.buf.len() >= MAX_PIECE_BYTES {
                    break;
                }
                from = self.buf.len().saturating_sub(2);
                let want = (self.buf.len() * 2).min(MAX_PIECE_BYTES);
                self.fill(want)?;
            }
            if cut.is_none() && !self.eof {
                // no exact cut in MAX_PIECE_BYTES (no spaces or newlines): any character boundary
                cut = (1..self.buf.len()).rev().find(|&i| self.buf[i] & 0xC0 != 0x80);
            }
        }
        let end = cut.unwrap_or(self.buf.len());
        let rest = self.buf.split_off(end);
        let piece = std::mem::replace(&mut self.buf, rest);
        let start = self.offset;
        self.offset += piece.len();
        String::from_utf8(piece).map(Some).map_err(|e| {
            Error::bad_file(
                &self.name,
                format!("not UTF-8 text (byte {}); save it as UTF-8", start + e.utf8_error().valid_up_to()),
            )
        })
    }
}

/// One line of a JSONL file as read by [`read_line`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The text of the line, without its `\n` / `\r\n`.
    Text(String),
    /// The line could not be used; why.
    Bad(String),
}

/// Reads the next line of at most [`MAX_LINE_BYTES`] (`max`, for tests); a longer line is
/// consumed without being kept and reported as bad, as is a line that is not UTF-8. `None` at
/// the end of the input.
pub fn read_line<R: BufRead>(r: &mut R, name: &str, max: usize) -> Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long = 0usize;
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(name, e)),
        };
        if avail.is_empty() {
            break;
        }
        any = true;
        let (take, done) = match avail.iter().position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if too_long == 0 && line.len() + take <= max + 2 {
            line.extend_from_slice(&avail[..take]);
        } else {
            too_long += line.len() + take;
            line.clear();
        }
        r.consume(take);
        if done {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if too_long > 0 {
        return Ok(Some(Line::Bad(format!(
            "the line is {} MiB, over the {} MiB limit; split it or read the file as --format text",
            too_long >> 20,
            max >> 20
        ))));
    }
    for end in [b'\n', b'\r'] {
        if line.last() == Some(&end) {
            line.pop();
        }
    }
    Ok(Some(match String::from_utf8(line) {
        Ok(s) => Line::Text(s),
        Err(e) => Line::Bad(format!(
            "not UTF-8 text (byte {} of the line); save the file as UTF-8",
            e.utf8_error().valid_up_to()
        )),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pieces(text: &[u8]) -> Vec<String> {
        let mut p = TextPieces::new(text, "t");
        let mut out = Vec::new();
        while let Some(s) = p.next_piece().unwrap() {
            out.push(s);
        }
        out
    }

    #[test]
    fn one_long_line_is_cut_into_bounded_pieces_before_single_spaces() {
        let text = "word, another. ".repeat(20_000); // 300 KB, no newline
        let got = pieces(text.as_bytes());
        assert_eq!(got.concat(), text);
        assert!(got.len() >= 4, "{} pieces", got.len());
        for w in got.windows(2) {
            assert!(w[0].len() <= MAX_PIECE_BYTES);
            assert!(
                w[1].starts_with(' ') && !w[1][1..].starts_with(char::is_whitespace),
                "{:?}",
                &w[1][..8]
            );
            assert!(!w[0].ends_with(char::is_whitespace));
        }
    }

    #[test]
    fn text_without_spaces_is_cut_at_character_boundaries() {
        let text = "é".repeat(MAX_PIECE_BYTES); // 2 MiB of two-byte characters
        let got = pieces(text.as_bytes());
        assert_eq!(got.concat(), text);
        assert!(got.len() >= 2 && got.iter().all(|p| p.len() <= MAX_PIECE_BYTES));
    }

    #[test]
    fn bad_utf8_is_reported_with_its_offset_in_the_file() {
        let mut bytes = "ok words here ".repeat(10_000).into_bytes();
        let at = bytes.len();
        bytes.extend_from_slice(b"\xff tail");
        let mut p = TextPieces::new(&bytes[..], "data.txt");
        let err = loop {
            match p.next_piece() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("data.txt") && err.contains(&format!("byte {at}")), "{err}");
    }

    #[test]
    fn lines_are_capped_and_numbered_by_the_caller() {
        let input = b"short\r\n"
            .iter()
            .chain(&[b'x'; 100])
            .chain(b"\nbad \xff\nlast")
            .copied()
            .collect::<Vec<u8>>();
        let mut r = std::io::BufReader::with_capacity(16, &input[..]);
        assert_eq!(read_line(&mut r, "t", 50).unwrap(), Some(Line::Text("short".into())));
        assert!(matches!(read_line(&mut r, "t", 50).unwrap(), Some(Line::Bad(why)) if why.contains("limit")));
        assert!(matches!(read_line(&mut r, "t", 50).unwrap(), Some(Line::Bad(why)) if why.contains("byte 4")));
        assert_eq!(read_line(&mut r, "t", 50).unwrap(), Some(Line::Text("last".into())));
        assert_eq!(read_line(&mut r, "t", 50).unwrap(), None);
    }

    #[test]
    fn the_hash_covers_the_whole_input() {
        let data = b"abc".repeat(1000);
        let mut h = Hashing::new(&data[..]);
        let mut first = [0u8; 10];
        h.read_exact(&mut first).unwrap();
        assert_eq!(h.finish().unwrap(), super::super::data::sha256_hex(&data));
    }
}
