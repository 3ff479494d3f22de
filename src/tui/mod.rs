//! The terminal UI: terminal setup and restore (on exit, error and panic), the input thread, and
//! the loop that feeds messages to [`app::App::update`], sends its commands to the engine and
//! draws at most ~30 frames a second.
//!
//! Threads, not async tasks: one input thread blocks on crossterm's `read`, the engine thread
//! owns the model, and both post into one std channel that this loop drains.

pub mod app;
pub mod compare_state;
pub mod demo;
pub mod editor;
pub mod finetune_state;
pub mod keymap;
pub mod picker;
pub mod store;
pub mod text;
pub mod theme;
pub mod ui;
pub mod update;
pub mod views;
pub mod widgets;

use std::io::{stdout, Stdout, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event, KeyboardEnhancementFlags,
    PopKeyboardEnhancementFlags, PushKeyboardEnhancementFlags,
};
use crossterm::execute;
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use crate::engine::protocol::{Command, EngineEvent, EngineOpts, FinetuneCommand, FinetuneEvent, LoadSpec};
use crate::engine::{panic_text, Engine, Source};
use crate::error::{Error, Result};
use crate::signals::{Signal, Signals};
use app::{App, Msg, TICKS_PER_SEC};

/// What `blackmamba chat` needs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub load: LoadSpec,
    /// How the engine runs the models it loads (the kernel switches of the command line).
    pub engine: EngineOpts,
    /// `--theme NAME|FILE`.
    pub theme: Option<String>,
    /// The user's theme overlays (`~/.config/blackmamba/themes`, read at the edge).
    pub theme_dir: Option<std::path::PathBuf>,
    /// The system prompt of the first chat (`--system`, `--system-file`).
    pub system: Option<String>,
    /// SIGINT, SIGTERM and SIGHUP: seen, the UI puts the terminal back and ends.
    pub signals: Signals,
}

/// How the UI ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The user quit (Ctrl-Q, or Ctrl-C with nothing running).
    Quit,
    /// A signal stopped it; the terminal is restored.
    Signal(Signal),
}

/// Shortest time between two frames.
const FRAME: Duration = Duration::from_millis(33);

/// Opens the TUI and runs it until the user quits or a signal comes. The terminal is put back on
/// every way out: return, error, signal and panic of this thread (panics of other threads are
/// shown in the UI instead, see [`PanicHook`]).
pub fn run(opts: Options) -> Result<Exit> {
    let (theme, warning) = theme::resolve(opts.theme.as_deref(), opts.theme_dir.as_deref());
    let mut app = App::new(theme);
    app.picker.quant.clone_from(&opts.load.quant);
    if let Some(w) = warning {
        app.notify(w, true);
    }
    let (tx, rx) = mpsc::channel::<Msg>();
    let _hook = PanicHook::install(tx.clone(), restore);
    let etx = tx.clone();
    let engine = Engine::spawn_with(
        Source::Spec(opts.load),
        opts.engine,
        Box::new(move |ev| {
            let _ = etx.send(Msg::Engine(ev));
        }),
    )?;
    if opts.system.is_some() {
        app.chat.system.clone_from(&opts.system);
        engine.send(Command::NewChat { system: opts.system });
    }
    let (guard, mut terminal) = TerminalGuard::enter()?;
    std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| input_loop(&tx))) {
                Ok(why) => why,
                Err(_) => "it panicked".into(),
            };
            let _ = tx.send(Msg::InputClosed(why));
        })
        .map_err(|e| Error::Invalid(format!("cannot start the input thread: {e}")))?;
    let result = match event_loop(&mut app, &mut terminal, &rx, &engine, &opts.signals) {
        // a closed terminal fails reads and writes and sends SIGHUP, in either order
        Err(e) => signal_within(&opts.signals, Duration::from_millis(300)).map_or(Err(e), |sig| Ok(Exit::Signal(sig))),
        ok => ok,
    };
    if let Some(b) = &app.busy {
        b.cancel.cancel();
    }
    // ratatui's Terminal shows the cursor when dropped and prints to stderr if it cannot, which
    // panics once the terminal is gone (SIGHUP): show it here and, if that fails, skip the drop.
    if terminal.show_cursor().is_err() {
        std::mem::forget(terminal);
    }
    drop(guard);
    // A signal during a fine-tuning run in the panel: save it, as `blackmamba finetune` does.
    let save_run = matches!(result, Ok(Exit::Signal(_))) && app.ft.run_to_save();
    if save_run {
        engine.send(Command::Finetune(FinetuneCommand::Save));
    }
    // Give the engine a moment to finish its token; don't hang the shell on a long prefill.
    engine.send(Command::Shutdown);
    let wait = Duration::from_secs(if save_run { 60 } else { 2 });
    let t0 = Instant::now();
    let mut saved: Option<std::result::Result<PathBuf, String>> = None;
    while !engine.is_finished() && t0.elapsed() < wait {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(Msg::Engine(EngineEvent::Finetune(FinetuneEvent::Saved(p)))) => saved = Some(Ok(p)),
            Ok(Msg::Engine(EngineEvent::Error { message, .. })) => saved = Some(Err(message)),
            _ => {}
        }
    }
    if save_run {
        // writeln, not eprintln: after SIGHUP stderr may be gone
        let mut err = std::io::stderr();
        let data = app.ft.spec.data.display();
        let _ = match saved {
            Some(Ok(p)) => writeln!(
                err,
                "saved the fine-tuning run to {0}; continue it with: blackmamba finetune --data {data} --resume {0}",
                p.display()
            ),
            Some(Err(e)) => writeln!(err, "saving the fine-tuning run failed: {e}"),
            None => writeln!(
                err,
                "the fine-tuning run was not saved: the engine did not answer within {} s",
                wait.as_secs()
            ),
        };
    }
    result
}

fn event_loop(
    app: &mut App,
    term: &mut Terminal<CrosstermBackend<Stdout>>,
    rx: &mpsc::Receiver<Msg>,
    engine: &Engine,
    signals: &Signals,
) -> Result<Exit> {
    let tick = Duration::from_millis(1000 / TICKS_PER_SEC);
    let mut next_tick = Instant::now() + tick;
    let mut last_draw = Instant::now() - FRAME;
    let mut dirty = true;
    let io = |e: std::io::Error| Error::io("terminal", e);
    loop {
        if let Some(sig) = signals.received() {
            return Ok(Exit::Signal(sig));
        }
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
            Err(RecvTimeoutError::Disconnected) => return Ok(Exit::Quit),
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
            if let Msg::InputClosed(why) = &m {
                return Err(Error::Invalid(format!("the terminal input stopped ({why})")));
            }
            if !matches!(m, Msg::Tick) {
                dirty = true;
            }
            for cmd in app.update(m) {
                engine.send(cmd);
            }
        }
        if app.quit {
            return Ok(Exit::Quit);
        }
    }
}

/// The signal received, waiting up to `wait` for one.
fn signal_within(signals: &Signals, wait: Duration) -> Option<Signal> {
    let t0 = Instant::now();
    loop {
        if let Some(sig) = signals.received() {
            return Some(sig);
        }
        if t0.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Forwards terminal events until the terminal fails or the UI is gone; returns why it stopped.
fn input_loop(tx: &mpsc::Sender<Msg>) -> String {
    loop {
        let msg = match crossterm::event::read() {
            Ok(Event::Key(k)) => Msg::Key(k),
            Ok(Event::Paste(s)) => Msg::Paste(s),
            Ok(Event::Mouse(m)) => Msg::Mouse(m),
            Ok(Event::Resize(w, h)) => Msg::Resize(w, h),
            Ok(_) => continue,
            Err(e) => return e.to_string(),
        };
        if tx.send(msg).is_err() {
            return "the UI has ended".into();
        }
    }
}

/// Puts the terminal into raw mode on the alternate screen with mouse and bracketed paste, and
/// puts it back when dropped (normal exit, errors and signals) or on a panic (see [`PanicHook`]).
struct TerminalGuard;

impl TerminalGuard {
    /// Enters the UI's terminal modes; returns the guard and the terminal to draw on.
    fn enter() -> Result<(Self, Terminal<CrosstermBackend<Stdout>>)> {
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
                Ok((Self, terminal))
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

/// The panic hook while the UI runs. A panic of the UI thread puts the terminal back and then
/// prints the usual message. A panic of any other thread (engine, model loader, input) leaves the
/// terminal alone, since the UI goes on: its message goes to the UI as [`Msg::Panicked`] and is
/// shown as an error. Dropping the guard puts the previous hook back.
pub struct PanicHook {
    prev: Arc<PrevHook>,
}

type PrevHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync + 'static>;

impl PanicHook {
    /// Installs the hook; the calling thread is the UI thread, `restore` puts the terminal back.
    pub fn install(tx: mpsc::Sender<Msg>, restore: fn()) -> Self {
        let ui = std::thread::current().id();
        let prev: Arc<PrevHook> = Arc::new(std::panic::take_hook());
        let chained = prev.clone();
        std::panic::set_hook(Box::new(move |info| {
            let me = std::thread::current();
            if me.id() == ui {
                restore();
                chained(info);
                return;
            }
            let message = match info.location() {
                Some(l) => format!("{} ({}:{})", panic_text(info.payload()), l.file(), l.line()),
                None => panic_text(info.payload()),
            };
            let thread = me.name().unwrap_or("unnamed").to_string();
            // the UI is gone: print as usual
            if tx.send(Msg::Panicked { thread, message }).is_err() {
                chained(info);
            }
        }));
        Self { prev }
    }
}

impl Drop for PanicHook {
    fn drop(&mut self) {
        let prev = self.prev.clone();
        std::panic::set_hook(Box::new(move |info| prev(info)));
    }
}
