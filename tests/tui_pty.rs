#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal with the embedded default model. Types a prompt,
//! watches tokens stream, visits every view, opens help, resizes, quits with exit code 0 and
//! leaves the terminal as it found it.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

fn nz(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n).unwrap()
}

struct Screen {
    parser: Arc<Mutex<vt100::Parser>>,
}

impl Screen {
    fn text(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }
    /// Waits until `pred` holds for the screen text.
    fn wait(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.text();
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
}

#[test]
fn chat_views_resize_and_quit_in_a_pty() {
    let pty = native_pty_system();
    let pair = pty
        .openpty(PtySize {
            rows: 24,
            cols: 80,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_blackmamba"));
    cmd.args(["--theme", "high-contrast"]);
    cmd.env("TERM", "xterm-256color");
    cmd.env("HOME", home.path());
    cmd.env("XDG_CONFIG_HOME", home.path());
    cmd.cwd(home.path());
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let parser = Arc::new(Mutex::new(vt100::Parser::new(nz(24), nz(80), 0)));
    let raw = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut reader = pair.master.try_clone_reader().unwrap();
    {
        let parser = parser.clone();
        let raw = raw.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser.lock().unwrap().process(&buf[..n]);
                raw.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let mut w = pair.master.take_writer().unwrap();
    let screen = Screen { parser: parser.clone() };
    let mut send = |bytes: &[u8]| {
        w.write_all(bytes).unwrap();
        w.flush().unwrap();
    };

    // the UI is up at once; the embedded model loads behind it
    screen.wait("the tab bar", 30, |s| s.contains("F1 Chat") && s.contains("F5 Fine-tune"));
    let s = screen.wait("the model", 120, |s| s.contains("cpu f32"));
    assert!(
        s.contains("embedded") && !s.contains("untrained demo weights"),
        "the embedded model, no demo banner:\n{s}"
    );

    // the sampling panel: max tokens 256 → 32 (Ctrl-P, 6 × Down, 7 × Left, Enter)
    send(b"\x10");
    for _ in 0..6 {
        send(b"\x1b[B");
    }
    for _ in 0..7 {
        send(b"\x1b[D");
    }
    screen.wait("max tokens 32", 20, |s| {
        s.lines().any(|l| l.contains("max tokens") && l.contains(" 32"))
    });
    send(b"\r");

    // chat: type, send, watch the answer stream and finish
    send(b"Hello, who are you?");
    screen.wait("the typed text", 10, |s| s.contains("Hello, who are you?"));
    send(b"\r");
    screen.wait("the turn to start", 30, |s| s.contains("You") && s.contains("BlackMamba"));
    screen.wait("tokens streaming", 60, |s| s.contains("generating") || s.contains("decode"));
    let s = screen.wait("the answer to finish", 120, |s| s.contains("decode") && s.contains("tok/s"));
    let answer_line = s.lines().skip_while(|l| !l.contains("BlackMamba")).nth(1).unwrap_or_default();
    assert!(
        !answer_line.trim().trim_matches('│').trim().is_empty(),
        "tokens were streamed:\n{s}"
    );

    // every view, by Tab, with its title
    for (title, marker) in [
        ("Routing", "experts"),
        ("Sinkhorn", "Convergence"),
        ("State", "SSM state"),
        ("Fine-tune", "Probe prompt routing"),
    ] {
        send(b"\t");
        screen.wait(title, 20, |s| s.contains(&format!("╭ {title} ")) && s.contains(marker));
    }
    send(b"\t");
    screen.wait("chat again", 20, |s| s.contains("╭ Chat "));

    // help opens with ? and closes with any key
    send(b"?");
    screen.wait("help", 20, |s| s.contains("Help: ↑↓ PgUp PgDn scroll"));
    send(b"x");
    screen.wait("help closed", 20, |s| !s.contains("Help: ↑↓ PgUp PgDn scroll"));

    // resize: the UI redraws at the new size
    pair.master
        .resize(PtySize {
            rows: 30,
            cols: 110,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    parser.lock().unwrap().set_size(nz(30), nz(110));
    screen.wait("a 110-column redraw", 20, |s| {
        s.lines().next().is_some_and(|l| l.trim_end().chars().count() > 80)
    });
    pair.master
        .resize(PtySize {
            rows: 6,
            cols: 19,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    parser.lock().unwrap().set_size(nz(6), nz(19));
    screen.wait("the tiny layout", 20, |s| s.contains("Ctrl-Q quits"));

    // Ctrl-Q quits with status 0 and restores the terminal
    send(b"\x11");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the app did not quit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    std::thread::sleep(Duration::from_millis(200));
    let raw = raw.lock().unwrap();
    let tail = String::from_utf8_lossy(&raw[raw.len().saturating_sub(200)..]).to_string();
    assert!(tail.contains("\x1b[?1049l"), "left the alternate screen: {tail:?}");
    assert!(!parser.lock().unwrap().screen().alternate_screen());
}
