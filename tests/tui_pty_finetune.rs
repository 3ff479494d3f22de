#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal fine-tunes the demo model from the
//! Fine-tune panel (a short run on a small chat file), saves the adapter, shows the training
//! batch's Sinkhorn, switches chat to the fine-tuned weights, and quits cleanly; then
//! `blackmamba chat --adapter DIR` opens on the base with that adapter.

mod ft_common;

#[path = "common/pty.rs"]
mod pty;

use pty::Tui;

const ROWS: u16 = 30;
const COLS: u16 = 100;

#[test]
fn finetune_from_the_panel_in_a_pty() {
    let home = tempfile::tempdir().unwrap();
    // the panel's default dataset and output are data.jsonl and adapter in the working folder
    std::fs::write(home.path().join("data.jsonl"), ft_common::chat_jsonl()).unwrap();
    let mut tui = Tui::spawn_at(home.path(), &[], ROWS, COLS, &[]);
    let (down, left) = (b"\x1b[B", b"\x1b[D");
    tui.wait("the model", 120, |s| s.contains("cpu f32"));

    // F5, then a short run: steps 200 → 10, seq len 256 → 16, batch 8 → 1
    tui.send(b"\x1b[15~");
    tui.wait("the Fine-tune view", 20, |s| s.contains("╭ Fine-tune "));
    tui.send_n(down, 6);
    tui.send_n(left, 19);
    tui.send(down);
    tui.send_n(left, 4);
    tui.send(down);
    tui.send_n(left, 7);
    // the value after a field's name in the Run box (past the ⇆ of the selected field)
    let field = |s: &str, name: &str, v: &str| {
        s.lines().any(|l| {
            l.split('│').any(|cell| {
                cell.trim_start()
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.split_whitespace().find(|w| *w != "⇆") == Some(v))
            })
        })
    };
    tui.wait("the form", 20, |s| {
        field(s, "steps", "10") && field(s, "seq len", "16") && field(s, "batch", "1")
    });
    tui.send(b"s");
    let s = tui.wait("the run to finish", 300, |s| {
        s.contains("finished · step 10/10") && s.contains("adapter saved to adapter")
    });
    assert!(s.contains("ETA"), "{s}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("adapter/adapter.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 10);
    assert!(home.path().join("adapter/adapter.safetensors").is_file());

    tui.send(b"u");
    tui.wait("chat on the fine-tuned weights", 20, |s| s.contains("chat with: fine-tuned"));

    // the Sinkhorn view shows the batch that routed the last step
    tui.send(b"\x1bOR");
    tui.send(b"t");
    tui.wait("the training batch", 20, |s| s.contains("training batch of step 10"));

    tui.quit();

    // the adapter on the command line: the TUI loads the base with it
    let tui = Tui::spawn_at(home.path(), &["chat", "--adapter", "adapter"], ROWS, COLS, &[]);
    tui.wait("the model with the adapter", 120, |s| s.contains("embedded + adapter adapter"));
    tui.quit();
}
