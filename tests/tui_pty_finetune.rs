#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal fine-tunes the demo model from the
//! Fine-tune panel (a short run on a small chat file), saves the adapter, shows the training
//! batch's Sinkhorn, switches chat to the fine-tuned weights, and quits cleanly; then
//! `blackmamba chat --adapter DIR` opens on the base with that adapter.

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

/// The binary in a pseudo-terminal of ROWS × COLS, started in `home` with `args`.
struct Tui {
    child: Box<dyn portable_pty::Child + Send + Sync>,
    parser: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    _master: Box<dyn portable_pty::MasterPty + Send>,
}

impl Tui {
    fn start(home: &std::path::Path, args: &[&str]) -> Self {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_blackmamba"));
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        cmd.env("HOME", home);
        cmd.env("XDG_CONFIG_HOME", home);
        cmd.cwd(home);
        let child = pair.slave.spawn_command(cmd).unwrap();
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
        let writer = pair.master.take_writer().unwrap();
        Self {
            child,
            parser,
            writer,
            _master: pair.master,
        }
    }

    fn send(&mut self, bytes: &[u8], times: usize) {
        for _ in 0..times {
            self.writer.write_all(bytes).unwrap();
            self.writer.flush().unwrap();
        }
    }

    fn wait(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        wait(&self.parser, what, secs, pred)
    }

    /// Ctrl-Q, and the exit status is success.
    fn quit(mut self) {
        self.send(b"\x11", 1);
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the app did not quit");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit status {status:?}");
    }
}

#[test]
fn finetune_from_the_panel_in_a_pty() {
    let home = tempfile::tempdir().unwrap();
    // the panel's default dataset and output are data.jsonl and adapter in the working folder
    std::fs::write(home.path().join("data.jsonl"), ft_common::chat_jsonl()).unwrap();
    let mut tui = Tui::start(home.path(), &[]);
    let (down, left) = (b"\x1b[B", b"\x1b[D");
    tui.wait("the model", 120, |s| s.contains("cpu f32"));

    // F5, then a short run: steps 200 → 10, seq len 256 → 16, batch 8 → 1
    tui.send(b"\x1b[15~", 1);
    tui.wait("the Fine-tune view", 20, |s| s.contains("╭ Fine-tune "));
    tui.send(down, 6);
    tui.send(left, 19);
    tui.send(down, 1);
    tui.send(left, 4);
    tui.send(down, 1);
    tui.send(left, 7);
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
    tui.send(b"s", 1);
    let s = tui.wait("the run to finish", 300, |s| {
        s.contains("finished · step 10/10") && s.contains("adapter saved to adapter")
    });
    assert!(s.contains("ETA"), "{s}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("adapter/adapter.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 10);
    assert!(home.path().join("adapter/adapter.safetensors").is_file());

    tui.send(b"u", 1);
    tui.wait("chat on the fine-tuned weights", 20, |s| s.contains("chat with: fine-tuned"));

    // the Sinkhorn view shows the batch that routed the last step
    tui.send(b"\x1bOR", 1);
    tui.send(b"t", 1);
    tui.wait("the training batch", 20, |s| s.contains("training batch of step 10"));

    tui.quit();

    // the adapter on the command line: the TUI loads the base with it
    let tui = Tui::start(home.path(), &["chat", "--adapter", "adapter"]);
    tui.wait("the model with the adapter", 120, |s| s.contains("embedded + adapter adapter"));
    tui.quit();
}
