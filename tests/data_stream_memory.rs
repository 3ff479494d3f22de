//! A large single-line text file loads in bounded memory (it once took ~50 bytes of memory per
//! byte of text, 2.6 GB for 50 MB, as the tokenizer saw it whole). One test in its own binary, so
//! that the process's peak memory is this test's.

#![allow(clippy::unwrap_used)]

use blackmamba::finetune::data::{self, DataFormat};

/// The process's peak resident memory (VmHWM), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
#[cfg(target_os = "linux")]
fn an_8_mb_single_line_file_loads_in_bounded_memory() {
    let tok = blackmamba::tokenizer::neox().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.txt");
    let unit = "Mamba layers carry a recurrent state, and experts route each token. ";
    let text = unit.repeat((8 << 20) / unit.len());
    std::fs::write(&p, &text).unwrap();
    let before = peak_rss();
    let ds = data::load(&p, DataFormat::Text, &tok, 1024, 50304).unwrap();
    let grew = peak_rss().saturating_sub(before);
    let tokens: usize = ds.examples.iter().map(|e| e.ids.len() - 1).sum();
    assert!(tokens > 1_000_000, "{tokens} tokens");
    // the ids and masks themselves take ~5 bytes per token; allow 4x that, not 50x the text
    let limit = 20 * tokens as u64 + (64 << 20);
    assert!(grew < limit, "peak memory grew by {} MB (limit {} MB)", grew >> 20, limit >> 20);
}
