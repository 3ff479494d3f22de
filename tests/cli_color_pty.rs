//! `--color never` and `NO_COLOR` reach the terminal UI: the real binary in a pseudo-terminal
//! draws no colour sequences, where by default it draws many.

#![allow(clippy::unwrap_used)]

#[path = "common/pty.rs"]
mod pty;

use pty::Tui;

/// Runs the TUI until its tab bar is drawn, quits with Ctrl-Q, and returns all it wrote.
fn tui_bytes(args: &[&str], no_color: bool) -> String {
    let env: &[(&str, &str)] = if no_color { &[("NO_COLOR", "1")] } else { &[] };
    let mut t = Tui::spawn(args, 24, 80, env, |_| {});
    t.wait("the tab bar", 30, |s| s.contains("F1 Chat") && s.contains("F5 Fine-tune"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    t.send(b"\x11");
    t.wait_exit("the app did not quit", 20);
    std::thread::sleep(std::time::Duration::from_millis(100));
    t.raw_text()
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
