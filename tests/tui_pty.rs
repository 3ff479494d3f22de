#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal with the embedded default model. Types a prompt,
//! watches tokens stream, visits every view, opens help, resizes, quits with exit code 0 and
//! leaves the terminal as it found it.

#[path = "common/pty.rs"]
mod pty;

use pty::Tui;

#[test]
fn chat_views_resize_and_quit_in_a_pty() {
    let mut t = Tui::spawn(&["--theme", "high-contrast"], 24, 80, &[], |_| {});
    // the UI is up at once; the embedded model loads behind it
    t.wait("the tab bar", 30, |s| s.contains("F1 Chat") && s.contains("F5 Fine-tune"));
    let s = t.wait("the model", 120, |s| s.contains("cpu f32"));
    assert!(
        s.contains("embedded") && !s.contains("untrained demo weights"),
        "the embedded model, no demo banner:\n{s}"
    );

    // the sampling panel: max tokens 256 → 32 (Ctrl-P, 6 × Down, 7 × Left, Enter)
    t.send(b"\x10");
    t.send_n(b"\x1b[B", 6);
    t.send_n(b"\x1b[D", 7);
    t.wait("max tokens 32", 20, |s| {
        s.lines().any(|l| l.contains("max tokens") && l.contains(" 32"))
    });
    t.send(b"\r");

    // chat: type, send, watch the answer stream and finish
    t.send(b"Hello, who are you?");
    t.wait("the typed text", 10, |s| s.contains("Hello, who are you?"));
    t.send(b"\r");
    t.wait("the turn to start", 30, |s| s.contains("You") && s.contains("BlackMamba"));
    t.wait("tokens streaming", 60, |s| s.contains("generating") || s.contains("decode"));
    let s = t.wait("the answer to finish", 120, |s| s.contains("decode") && s.contains("tok/s"));
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
        ("Compare", "pick model B"),
    ] {
        t.send(b"\t");
        t.wait(title, 20, |s| s.contains(&format!("╭ {title} ")) && s.contains(marker));
    }
    t.send(b"\t");
    t.wait("chat again", 20, |s| s.contains("╭ Chat "));

    // help opens with ? and closes with any key
    t.send(b"?");
    t.wait("help", 20, |s| s.contains("Help: ↑↓ PgUp PgDn scroll"));
    t.send(b"x");
    t.wait("help closed", 20, |s| !s.contains("Help: ↑↓ PgUp PgDn scroll"));

    // resize: the UI redraws at the new size
    t.resize(30, 110);
    t.wait("a 110-column redraw", 20, |s| {
        s.lines().next().is_some_and(|l| l.trim_end().chars().count() > 80)
    });
    t.resize(6, 19);
    t.wait("the tiny layout", 20, |s| s.contains("Ctrl-Q quits"));

    // Ctrl-Q quits with status 0 and restores the terminal
    t.send(b"\x11");
    let status = t.wait_exit("the app did not quit", 20);
    assert!(status.success(), "exit status {status:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let tail = t.raw_tail(200);
    assert!(tail.contains("\x1b[?1049l"), "left the alternate screen: {tail:?}");
    assert!(!t.alternate_screen());
}
