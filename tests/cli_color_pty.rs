//! `--color never` and `NO_COLOR` reach the terminal UI: the real binary in a pseudo-terminal
//! draws no colour sequences, where by default it draws many.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

/// Runs the TUI until its tab bar is drawn, quits with Ctrl-Q, and returns all it wrote.
fn tui_bytes(args: &[&str], no_color: bool) -> String {
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: 24,
            cols: 80,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_blackmamba"));
    cmd.args(args);
    cmd.env("TERM", "xterm-256color");
    cmd.env("HOME", home.path());
    cmd.env("XDG_CONFIG_HOME", home.path());
    cmd.env_remove("NO_COLOR");
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    cmd.cwd(home.path());
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let raw = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut reader = pair.master.try_clone_reader().unwrap();
    {
        let raw = raw.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                raw.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let text = || String::from_utf8_lossy(&raw.lock().unwrap()).to_string();
    let t0 = Instant::now();
    while !(text().contains("F1 Chat") && text().contains("F5 Fine-tune")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no tab bar: {:?}", text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut w = pair.master.take_writer().unwrap();
    w.write_all(b"\x11").unwrap();
    w.flush().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the app did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    text()
}

/// SGR colour sequences: foreground or background, 256-colour or RGB.
fn has_colour(s: &str) -> bool {
    ["\x1b[38;", "\x1b[48;"].iter().any(|m| s.contains(m))
}

#[test]
fn color_never_and_no_color_draw_the_tui_without_colour() {
    assert!(has_colour(&tui_bytes(&[], false)), "the default draws colour");
    assert!(!has_colour(&tui_bytes(&["--color", "never"], false)), "--color never");
    assert!(!has_colour(&tui_bytes(&[], true)), "NO_COLOR");
    assert!(
        has_colour(&tui_bytes(&["--color", "always"], true)),
        "--color always beats NO_COLOR"
    );
}
