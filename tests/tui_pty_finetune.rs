#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal fine-tunes the demo model from the
//! Fine-tune panel (a short run on a small chat file), saves the adapter, shows the training
//! batch's Sinkhorn, switches chat to the fine-tuned weights, and quits cleanly.

mod ft_common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

const ROWS: u16 = 30;
const COLS: u16 = 100;

fn screen_text(p: &Mutex<vt100::Parser>) -> String {
    p.lock().unwrap().screen().contents()
}

fn wait(p: &Mutex<vt100::Parser>, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let s = screen_text(p);
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; screen:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn finetune_from_the_panel_in_a_pty() {
    let home = tempfile::tempdir().unwrap();
    // the panel's default dataset and output are data.jsonl and adapter in the working folder
    std::fs::write(home.path().join("data.jsonl"), ft_common::chat_jsonl()).unwrap();
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_blackmamba"));
    cmd.env("TERM", "xterm-256color");
    cmd.env("HOME", home.path());
    cmd.env("XDG_CONFIG_HOME", home.path());
    cmd.cwd(home.path());
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let parser = Arc::new(Mutex::new(vt100::Parser::new(
        std::num::NonZeroU16::new(ROWS).unwrap(),
        std::num::NonZeroU16::new(COLS).unwrap(),
        0,
    )));
    let mut reader = pair.master.try_clone_reader().unwrap();
    {
        let parser = parser.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser.lock().unwrap().process(&buf[..n]);
            }
        });
    }
    let mut w = pair.master.take_writer().unwrap();
    let mut send = |bytes: &[u8], times: usize| {
        for _ in 0..times {
            w.write_all(bytes).unwrap();
            w.flush().unwrap();
        }
    };
    let (down, left) = (b"\x1b[B", b"\x1b[D");
    wait(&parser, "the model", 120, |s| s.contains("cpu f32"));

    // F5, then a short run: steps 200 → 10, seq len 256 → 16, batch 8 → 1
    send(b"\x1b[15~", 1);
    wait(&parser, "the Fine-tune view", 20, |s| s.contains("╭ Fine-tune "));
    send(down, 6);
    send(left, 19);
    send(down, 1);
    send(left, 4);
    send(down, 1);
    send(left, 7);
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
    wait(&parser, "the form", 20, |s| {
        field(s, "steps", "10") && field(s, "seq len", "16") && field(s, "batch", "1")
    });
    send(b"s", 1);
    let s = wait(&parser, "the run to finish", 300, |s| {
        s.contains("finished · step 10/10") && s.contains("adapter saved to adapter")
    });
    assert!(s.contains("ETA"), "{s}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("adapter/adapter.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 10);
    assert!(home.path().join("adapter/adapter.safetensors").is_file());

    send(b"u", 1);
    wait(&parser, "chat on the fine-tuned weights", 20, |s| {
        s.contains("chat with: fine-tuned")
    });

    // the Sinkhorn view shows the batch that routed the last step
    send(b"\x1bOR", 1);
    send(b"t", 1);
    wait(&parser, "the training batch", 20, |s| s.contains("training batch of step 10"));

    send(b"\x11", 1);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the app did not quit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}
