//! The terminal UI: terminal setup and restore (on exit, error and panic), the input thread, and
//! the loop that feeds messages to [`app::App::update`], sends its commands to the engine and
//! draws at most ~30 frames a second.
//!
//! Threads, not async tasks: one input thread blocks on crossterm's `read`, the engine thread
//! owns the model, and both post into one std channel that this loop drains.

pub mod app;
pub mod demo;
pub mod finetune_state;
pub mod keymap;
pub mod picker;
pub mod store;
pub mod text;
pub mod theme;
pub mod ui;
pub mod views;
pub mod widgets;

use std::io::{stdout, Stdout};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event, KeyboardEnhancementFlags,
    PopKeyboardEnhancementFlags, PushKeyboardEnhancementFlags,
};
use crossterm::execute;
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use crate::engine::protocol::{Command, LoadSpec};
use crate::engine::{Engine, Source};
use crate::error::{Error, Result};
use app::{App, Msg, TICKS_PER_SEC};

/// What `blackmamba chat` needs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub load: LoadSpec,
    /// `--theme NAME|FILE`.
    pub theme: Option<String>,
}

/// Shortest time between two frames.
const FRAME: Duration = Duration::from_millis(33);

/// Opens the TUI and runs it until the user quits.
pub fn run(opts: Options) -> Result<()> {
    let (theme, warning) = theme::resolve(opts.theme.as_deref());
    let mut app = App::new(theme);
    if let Some(w) = warning {
        app.notify(w, true);
    }
    install_panic_hook();
    let (tx, rx) = mpsc::channel::<Msg>();
    let etx = tx.clone();
    let engine = Engine::spawn(
        Source::Spec(opts.load),
        Box::new(move |ev| {
            let _ = etx.send(Msg::Engine(ev));
        }),
    )?;
    let mut guard = TerminalGuard::enter()?;
    std::thread::Builder::new()
        .name("input".into())
        .spawn(move || input_loop(&tx))
        .map_err(|e| Error::Invalid(format!("cannot start the input thread: {e}")))?;
    let result = event_loop(&mut app, &mut guard.terminal, &rx, &engine);
    if let Some(b) = &app.busy {
        b.cancel.cancel();
    }
    drop(guard);
    // Give the engine a moment to finish its token; don't hang the shell on a long prefill.
    engine.send(Command::Shutdown);
    let t0 = Instant::now();
    while !engine.is_finished() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    result
}

fn event_loop(app: &mut App, term: &mut Terminal<CrosstermBackend<Stdout>>, rx: &mpsc::Receiver<Msg>, engine: &Engine) -> Result<()> {
    let tick = Duration::from_millis(1000 / TICKS_PER_SEC);
    let mut next_tick = Instant::now() + tick;
    let mut last_draw = Instant::now() - FRAME;
    let mut dirty = true;
    let io = |e: std::io::Error| Error::io("terminal", e);
    loop {
        if dirty && last_draw.elapsed() >= FRAME {
            term.draw(|f| ui::draw(app, f.area(), f.buffer_mut())).map_err(io)?;
            last_draw = Instant::now();
            dirty = false;
        }
        let now = Instant::now();
        let mut wait = next_tick.saturating_duration_since(now);
        if dirty {
            wait = wait.min(FRAME.saturating_sub(last_draw.elapsed()));
        }
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut msgs: Vec<Msg> = first.into_iter().collect();
        msgs.extend(rx.try_iter().take(10_000));
        if Instant::now() >= next_tick {
            next_tick += tick;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + tick;
            }
            msgs.push(Msg::Tick);
            // redraw on ticks only when something moves (spinner, elapsed time, notice expiry)
            dirty |= app.busy.is_some() || app.model.is_none() || app.switching.is_some() || app.notice.is_some();
        }
        for m in msgs {
            if !matches!(m, Msg::Tick) {
                dirty = true;
            }
            for cmd in app.update(m) {
                engine.send(cmd);
            }
        }
        if app.quit {
            return Ok(());
        }
    }
}

fn input_loop(tx: &mpsc::Sender<Msg>) {
    loop {
        let msg = match crossterm::event::read() {
            Ok(Event::Key(k)) => Msg::Key(k),
            Ok(Event::Paste(s)) => Msg::Paste(s),
            Ok(Event::Mouse(m)) => Msg::Mouse(m),
            Ok(Event::Resize(w, h)) => Msg::Resize(w, h),
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// Puts the terminal into raw mode on the alternate screen with mouse and bracketed paste, and
/// puts it back when dropped (normal exit and errors) or on a panic (see [`install_panic_hook`]).
struct TerminalGuard {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    fn enter() -> Result<Self> {
        let io = |e: std::io::Error| Error::io("terminal", e);
        enable_raw_mode().map_err(|e| {
            Error::Invalid(format!(
                "cannot switch the terminal to raw mode ({e}); run blackmamba in a terminal"
            ))
        })?;
        let mut out = stdout();
        if let Err(e) = execute!(out, EnterAlternateScreen, EnableMouseCapture, EnableBracketedPaste) {
            restore();
            return Err(io(e));
        }
        // Shift-Enter is only distinguishable with the kitty keyboard protocol; terminals without
        // it ignore the request.
        let _ = execute!(
            out,
            PushKeyboardEnhancementFlags(KeyboardEnhancementFlags::DISAMBIGUATE_ESCAPE_CODES)
        );
        match Terminal::new(CrosstermBackend::new(stdout())) {
            Ok(mut terminal) => {
                let _ = terminal.hide_cursor();
                let _ = terminal.clear();
                Ok(Self { terminal })
            }
            Err(e) => {
                restore();
                Err(io(e))
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves raw mode and the alternate screen; safe to call more than once.
pub fn restore() {
    let mut out = stdout();
    let _ = execute!(out, PopKeyboardEnhancementFlags);
    let _ = execute!(
        out,
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
    let _ = disable_raw_mode();
}

/// Restores the terminal before the default panic message is printed. Panics of the engine thread
/// are not printed over the screen: the engine reports them as a fatal event.
fn install_panic_hook() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("engine") {
            return;
        }
        restore();
        prev(info);
    }));
}
