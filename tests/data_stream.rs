//! Data files are streamed: a long single-line text gives the same windows as tokenizing it
//! whole, and JSONL lines that are not UTF-8 or too long are reported by number, not fatal.

#![allow(clippy::unwrap_used)]

use blackmamba::finetune::data::{self, DataFormat};
use blackmamba::tokenizer::{encode, neox};

#[test]
fn a_single_line_text_is_tokenized_in_pieces_exactly_as_whole() {
    let tok = neox().unwrap();
    // ~400 KB on one line: several pieces, cut only before single spaces
    let mut text = String::new();
    for i in 0..40_000 {
        text.push_str(["The ", "cat, ", "sat   on ", "42 ", "mats. ", "naïve ", "\"quoted\" "][i % 7]);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("one-line.txt");
    std::fs::write(&p, &text).unwrap();
    let seq_len = 100;
    let ds = data::load(&p, DataFormat::Auto, &tok, seq_len, 50304).unwrap();
    let ids = encode(&tok, &text).unwrap();
    let mut want = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        want.push(ids[start..(start + seq_len + 1).min(ids.len())].to_vec());
        start += seq_len;
    }
    let got: Vec<Vec<u32>> = ds.examples.iter().map(|e| e.ids.clone()).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the windows differ from the whole text's");
    assert_eq!(ds.hash, data::sha256_hex(text.as_bytes()));
}

#[test]
fn bad_jsonl_lines_are_skipped_with_their_numbers() {
    let tok = neox().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"text\": \"first fine line\"}\n");
    bytes.extend_from_slice(b"{\"text\": \"bad \xff byte\"}\n");
    bytes.extend_from_slice(format!("{{\"text\": \"{}\"}}\n", "x".repeat(5 << 20)).as_bytes());
    bytes.extend_from_slice(b"not json\r\n");
    bytes.extend_from_slice(b"{\"text\": \"last fine line\"}");
    std::fs::write(&p, &bytes).unwrap();
    let ds = data::load(&p, DataFormat::Auto, &tok, 64, 50304).unwrap();
    assert_eq!(ds.examples.len(), 2);
    let bad: Vec<(usize, &str)> = ds.bad.iter().map(|b| (b.line, b.reason.as_str())).collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert_eq!(bad[0].0, 2);
    assert!(bad[0].1.contains("not UTF-8"), "{bad:?}");
    assert_eq!(bad[1].0, 3);
    assert!(bad[1].1.contains("MiB limit"), "{bad:?}");
    assert_eq!(bad[2].0, 4);
    assert!(bad[2].1.contains("not valid JSON"), "{bad:?}");
    assert_eq!(ds.hash, data::sha256_hex(&bytes));
}

#[test]
fn a_text_file_that_is_not_utf8_names_the_byte() {
    let tok = neox().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.txt");
    let mut bytes = "words and more words ".repeat(10_000).into_bytes();
    let at = bytes.len();
    bytes.extend_from_slice(b"\xc3(");
    std::fs::write(&p, &bytes).unwrap();
    let err = data::load(&p, DataFormat::Auto, &tok, 64, 50304).unwrap_err().to_string();
    assert!(err.contains("t.txt") && err.contains(&format!("byte {at}")), "{err}");
}
