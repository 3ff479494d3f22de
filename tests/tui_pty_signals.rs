#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal gets SIGTERM, SIGHUP or SIGINT from `kill`
//! while the UI runs. It must put the terminal back (cooked mode, main screen, mouse and paste
//! modes off, cursor shown) and exit with 128 + the signal's number.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};
use pty::Tui;

#[path = "common/pty.rs"]
mod pty;

fn signal_restores_and_exits(sig: &str, code: u32) {
    let mut t = Tui::spawn(&[], 24, 80, &[], |_| {});
    t.wait("the UI", 60, |s| s.contains("F1 Chat"));
    assert!(t.alternate_screen());
    assert!(!t.local_flags().contains("ICANON"), "raw mode while the UI runs");

    t.kill(sig);
    let status = t.wait_exit(&format!("SIG{sig} did not end the app"), 20);
    assert_eq!(
        (status.exit_code(), status.signal()),
        (code, None),
        "SIG{sig}: exit code 128 + signal number, not killed by the signal"
    );
    std::thread::sleep(Duration::from_millis(200));
    let flags = t.local_flags();
    assert!(flags.contains("ICANON") && flags.contains("ECHO"), "cooked mode again: {flags}");
    let tail = t.raw_tail(400);
    for (seq, what) in [
        ("\x1b[?1049l", "main screen"),
        ("\x1b[?1000l", "mouse capture off"),
        ("\x1b[?2004l", "bracketed paste off"),
        ("\x1b[?25h", "cursor shown"),
    ] {
        assert!(tail.contains(seq), "{what}: {tail:?}");
    }
    assert!(!t.alternate_screen());
}

#[test]
fn sigterm_restores_the_terminal_and_exits_143() {
    signal_restores_and_exits("TERM", 143);
}

#[test]
fn sighup_restores_the_terminal_and_exits_129() {
    signal_restores_and_exits("HUP", 129);
}

#[test]
fn sigint_restores_the_terminal_and_exits_130() {
    signal_restores_and_exits("INT", 130);
}

#[test]
fn closing_the_terminal_ends_the_app_with_129() {
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
    cmd.env("TERM", "xterm-256color");
    cmd.env("HOME", home.path());
    cmd.cwd(home.path());
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let seen = Arc::new(Mutex::new(String::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // the reader holds a copy of the master: it lets go after the next output once `stop` is set
    let mut reader = pair.master.try_clone_reader().unwrap();
    let reading = {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let t0 = Instant::now();
    while !seen.lock().unwrap().contains("F1 Chat") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the UI did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    // the terminal window closes: every handle on the master goes, and the kernel hangs up
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut w = pair.master.take_writer().unwrap();
    w.write_all(b"x").unwrap();
    w.flush().unwrap();
    drop(w);
    reading.join().unwrap();
    drop(pair.master);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the app outlived its terminal");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((status.exit_code(), status.signal()), (129, None));
}

#[test]
fn sigterm_during_a_panel_run_saves_it_and_exits_143() {
    // the panel's default dataset and output are data.jsonl and adapter in the working folder
    let mut t = Tui::spawn(&[], 30, 100, &[], |home| {
        std::fs::write(
            home.join("data.jsonl"),
            "{\"prompt\": \"Where did the dog sit?\", \"response\": \"On the mat.\"}\n".repeat(40),
        )
        .unwrap();
    });
    t.wait("the model", 120, |s| s.contains("cpu f32"));
    // F5; seq len 256 → 16, batch 8 → 1; 200 steps; start
    t.send(b"\x1b[15~");
    t.wait("the Fine-tune view", 20, |s| s.contains("╭ Fine-tune "));
    t.send_n(b"\x1b[B", 7);
    t.send_n(b"\x1b[D", 4);
    t.send_n(b"\x1b[B", 1);
    t.send_n(b"\x1b[D", 7);
    t.send(b"s");
    let step = |s: &str| -> usize {
        s.split("step ")
            .filter_map(|t| t.split("/200").next().and_then(|n| n.trim().parse().ok()))
            .max()
            .unwrap_or(0)
    };
    let s = t.wait("a few steps", 300, |s| step(s) >= 3);
    let seen = step(&s);

    t.kill("TERM");
    let status = t.wait_exit("SIGTERM did not end the app", 60);
    assert_eq!((status.exit_code(), status.signal()), (143, None));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.home.join("adapter/trainer_state.json")).unwrap()).unwrap();
    let saved = state["step"].as_u64().unwrap() as usize;
    assert!(saved >= seen && saved < 200, "saved at step {saved}, the screen showed {seen}");
    let s = t.text();
    assert!(s.contains("saved the fine-tuning run to adapter"), "{s}");
}
