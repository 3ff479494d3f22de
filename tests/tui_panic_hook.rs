#![allow(clippy::unwrap_used)]
//! The TUI's panic hook (one test in its own binary: the hook is process-wide). A panic of a
//! background thread (here one named like the model loader's) must not touch the terminal, since
//! the UI goes on: it reaches the UI as a message. A panic of the UI thread restores the terminal
//! first. Dropping the hook puts the previous one back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::time::Duration;

use blackmamba::tui::app::Msg;
use blackmamba::tui::PanicHook;

static RESTORED: AtomicUsize = AtomicUsize::new(0);

fn count_restore() {
    RESTORED.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn background_panics_reach_the_ui_and_leave_the_terminal_alone() {
    let (tx, rx) = channel();
    let hook = PanicHook::install(tx, count_restore);

    let job = std::thread::Builder::new()
        .name("loader".into())
        .spawn(|| panic!("bad tensor header"))
        .unwrap();
    assert!(job.join().is_err());
    match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        Msg::Panicked { thread, message } => {
            assert_eq!(thread, "loader");
            assert!(
                message.contains("bad tensor header") && message.contains("tui_panic_hook.rs"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(RESTORED.load(Ordering::SeqCst), 0, "the UI still runs: raw mode stays");

    // the UI thread's own panic: the terminal comes back before the message is printed
    assert!(std::panic::catch_unwind(|| panic!("a bug in the UI")).is_err());
    assert_eq!(RESTORED.load(Ordering::SeqCst), 1);
    assert!(rx.try_recv().is_err());

    drop(hook);
    assert!(std::thread::spawn(|| panic!("after the UI")).join().is_err());
    assert!(std::panic::catch_unwind(|| panic!("after the UI")).is_err());
    assert_eq!(RESTORED.load(Ordering::SeqCst), 1, "the old hook is back");
    assert!(rx.try_recv().is_err());
}
