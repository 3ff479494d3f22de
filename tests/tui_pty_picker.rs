#![allow(clippy::unwrap_used)]
//! End to end: the real binary in a pseudo-terminal switches models with the picker (Ctrl-K).
//! The hub cache is a fake one built here (offline, with the real layout) holding a tiny
//! "Zyphra/BlackMamba-2.8B": the picker lists it as cached, loads it (converting it on the way),
//! chats with it, then lists it as ready; an uncached repo is refused offline with the reason; a
//! typed `random:tiny` loads with the demo banner; Ctrl-Q exits 0.

mod common;

#[path = "common/pty.rs"]
mod pty;

use std::path::Path;

use blackmamba::model::pth_write;
use pty::Tui;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A cache with `models--Zyphra--BlackMamba-2.8B` holding a tiny model (GPT-NeoX vocabulary).
fn fake_cache(cache: &Path) {
    let repo = cache.join("models--Zyphra--BlackMamba-2.8B");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let cfg = common::tiny_config(&["r", "8"], 16, 50304);
    std::fs::write(repo.join("blobs/a1"), cfg.to_json_string().unwrap()).unwrap();
    pth_write::write(&repo.join("blobs/b2"), &common::tiny_model(&cfg, 11).named_tensors().unwrap()).unwrap();
    std::os::unix::fs::symlink("../../blobs/a1", snap.join("config.json")).unwrap();
    std::os::unix::fs::symlink("../../blobs/b2", snap.join("pytorch_model.bin")).unwrap();
}

/// The line of the screen below the tab bar that names `what`.
fn line_of<'a>(s: &'a str, what: &str) -> &'a str {
    s.lines().skip(1).find(|l| l.contains(what)).unwrap_or_default()
}

#[test]
fn pick_a_cached_hub_model_chat_and_switch_again_in_a_pty() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    fake_cache(&cache);
    let cache = cache.to_str().unwrap().to_string();
    let mut t = Tui::spawn_in(home, &[], 28, 100, &[("HF_HUB_CACHE", &cache), ("HF_HUB_OFFLINE", "1")]);
    let down = b"\x1b[B";
    let up = b"\x1b[A";

    t.wait("the embedded model", 120, |s| s.contains("cpu f32") && s.contains(" embedded "));

    // Ctrl-K lists what the cache holds: the 2.8B cached (not converted), the 1.5B out of reach
    t.send(b"\x0b");
    let s = t.wait("the list", 30, |s| s.contains("Model: Enter loads") && s.contains("random:tiny"));
    assert!(line_of(&s, "Zyphra/BlackMamba-2.8B").contains("cached, converts once"), "{s}");
    assert!(line_of(&s, "Zyphra/BlackMamba-1.5B").contains("offline, not cached"), "{s}");
    assert!(line_of(&s, " embedded").contains("●"), "the loaded model is marked:\n{s}");
    assert!(s.contains("offline: cache only"), "{s}");

    // the 2.8B: third row
    t.send(down);
    t.send(down);
    t.send(b"\r");
    let s = t.wait("the switch", 120, |s| s.contains("loaded Zyphra/BlackMamba-2.8B"));
    assert!(
        s.lines().next().unwrap_or_default().contains("Zyphra/BlackMamba-2.8B"),
        "the tab bar names it:\n{s}"
    );
    assert!(s.contains("cpu f32"), "{s}");

    // chat with it
    t.send(b"Hello there");
    t.wait("the typed text", 10, |s| s.contains("Hello there"));
    t.send(b"\r");
    t.wait("the answer", 120, |s| s.contains("decode") && s.contains("tok/s"));

    // converted by that load: now ready
    t.send(b"\x0b");
    let s = t.wait("the list again", 30, |s| {
        s.contains("Model: Enter loads") && line_of(s, "Zyphra/BlackMamba-2.8B").contains("ready")
    });
    assert!(line_of(&s, "Zyphra/BlackMamba-2.8B").contains("●"), "{s}");
    assert!(
        s.contains("loading another model ends this chat"),
        "a warning while a chat is open:\n{s}"
    );

    // the 1.5B (one row up from the loaded one) is refused offline, with the reason
    t.send(up);
    t.send(b"\r");
    let s = t.wait("the refusal", 20, |s| s.contains("HF_HUB_OFFLINE is set"));
    assert!(s.contains("Model: Enter loads"), "the picker stays open:\n{s}");

    // a typed entry: random weights, with the demo banner
    t.send(b"random:tiny@3");
    t.wait("the typed entry", 10, |s| s.contains("other: random:tiny@3"));
    t.send(b"\r");
    let s = t.wait("random weights", 120, |s| s.contains("loaded random:tiny@3"));
    assert!(s.contains("untrained demo weights"), "{s}");
    assert!(!s.contains("Hello there"), "the old chat is gone:\n{s}");

    t.send(b"\x11");
    let status = t.wait_exit("the app did not quit", 20);
    assert!(status.success(), "exit status {status:?}");
}
