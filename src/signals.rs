//! Process signals as plain data: SIGINT, SIGTERM and SIGHUP set a flag that long-running loops
//! (the TUI's event loop, the fine-tuning loop) poll, so that they can put the terminal back or
//! save a checkpoint before the process ends with the signal's exit code (128 + its number).
//!
//! The handlers only store a number (async-signal-safe); all the work happens in the loop that
//! sees it. Built on `signal-hook`'s `flag` module, which needs no `unsafe` here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// The `--help` text that lists the exit codes (also in the README's "Troubleshooting / exit codes").
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    error (the message on stderr names the file, option or step)
  2    bad command line (usage)
  129  SIGHUP (terminal closed)
  130  SIGINT (Ctrl-C)
  143  SIGTERM (kill, timeout, docker stop, schedulers)
The TUI puts the terminal back before it exits on any of these signals (and saves a run of its
fine-tune panel). finetune and train save a checkpoint first: continue with --resume DIR. A second signal while a training step runs ends
at once, keeping the last saved checkpoint.";

/// A signal that stops the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C outside raw mode, `kill -INT`.
    Interrupt,
    /// SIGTERM: `kill`, `timeout`, `docker stop`, job schedulers.
    Terminate,
    /// SIGHUP: the terminal went away.
    Hangup,
}

impl Signal {
    /// Every signal handled, in the order they are registered.
    pub const ALL: [Self; 3] = [Self::Interrupt, Self::Terminate, Self::Hangup];

    /// The POSIX signal number (the same on Linux and macOS).
    pub fn number(self) -> i32 {
        match self {
            Self::Hangup => 1,
            Self::Interrupt => 2,
            Self::Terminate => 15,
        }
    }

    /// The signal for a POSIX number.
    pub fn from_number(n: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|s| usize::try_from(s.number()).ok() == Some(n))
    }

    /// The conventional exit code of a program stopped by this signal: 128 + its number.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Hangup => 129,
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }

    /// `SIGINT`, `SIGTERM` or `SIGHUP`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
            Self::Hangup => "SIGHUP",
        }
    }
}

/// The error a command returns when a signal stopped it; `main` turns it into the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped by {}", .0.name())]
pub struct Interrupted(pub Signal);

/// The first of SIGINT, SIGTERM and SIGHUP received since [`Signals::install`].
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// The signal's number; 0 until one comes.
    last: Arc<AtomicUsize>,
}

impl Signals {
    /// Registers the handlers. With `second_exits`, a second signal while the first is still being
    /// handled ends the process at once with that signal's exit code: for loops that look at the
    /// flag only between long steps. Without it, every signal only sets the flag (the TUI, which
    /// looks at it ten times a second and must put the terminal back).
    pub fn install(second_exits: bool) -> Result<Self> {
        let last = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        for sig in Self::handled() {
            let Ok(n) = usize::try_from(sig.number()) else { continue };
            let fail = |e: std::io::Error| Error::Invalid(format!("cannot handle {}: {e}", sig.name()));
            if second_exits {
                // runs before the flag below is set, so only a second signal exits
                signal_hook::flag::register_conditional_shutdown(sig.number(), i32::from(sig.exit_code()), seen.clone()).map_err(fail)?;
                signal_hook::flag::register(sig.number(), seen.clone()).map_err(fail)?;
            }
            signal_hook::flag::register_usize(sig.number(), last.clone(), n).map_err(fail)?;
        }
        Ok(Self { last })
    }

    /// The signals this platform can deliver (no SIGHUP on Windows).
    fn handled() -> impl Iterator<Item = Signal> {
        Signal::ALL.into_iter().filter(|s| cfg!(unix) || *s != Signal::Hangup)
    }

    /// A flag that no signal sets (tests; programs that embed the TUI and handle signals themselves).
    pub fn none() -> Self {
        Self::default()
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<Signal> {
        Signal::from_number(self.last.load(Ordering::SeqCst))
    }

    /// Records `sig` as if it had been received (tests, and programs that relay signals).
    pub fn raise(&self, sig: Signal) {
        if let Ok(n) = usize::try_from(sig.number()) {
            self.last.store(n, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_128_plus_the_signal_number() {
        for s in Signal::ALL {
            assert_eq!(i32::from(s.exit_code()), 128 + s.number(), "{}", s.name());
            assert_eq!(Signal::from_number(usize::try_from(s.number()).unwrap_or(0)), Some(s));
            assert!(EXIT_CODES_HELP.contains(&format!("{}  {}", s.exit_code(), s.name())));
        }
        assert_eq!(Signal::from_number(0), None);
    }

    #[test]
    fn raise_is_seen_and_none_stays_quiet() {
        let s = Signals::none();
        assert_eq!(s.received(), None);
        let c = s.clone();
        c.raise(Signal::Terminate);
        assert_eq!(s.received(), Some(Signal::Terminate));
    }
}
