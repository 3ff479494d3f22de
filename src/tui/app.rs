//! The App: all UI state, changed only by [`App::update`] (in `update.rs`, with the keys of each
//! view in the view's module); views draw it without changing it.

use crossterm::event::{KeyEvent, MouseEvent};

use crate::chat_template::Role as Speaker;
use crate::engine::protocol::{CancelFlag, Command, EngineEvent, ModelInfo, ReqId, SinkhornReport};
use crate::generate::{GenStats, StopReason};
use crate::sampling::SamplingParams;
use crate::tui::compare_state::CompareState;
use crate::tui::editor::Editor;
use crate::tui::finetune_state::FinetuneState;
use crate::tui::keymap::{step_in, Binding, Chord};
use crate::tui::picker::Picker;
use crate::tui::store::Telemetry;
use crate::tui::theme::Theme;

/// The six views, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Chat,
    Routing,
    Sinkhorn,
    State,
    Finetune,
    Compare,
}

impl View {
    pub const ALL: [Self; 6] = [
        Self::Chat,
        Self::Routing,
        Self::Sinkhorn,
        Self::State,
        Self::Finetune,
        Self::Compare,
    ];
    pub fn title(self) -> &'static str {
        match self {
            Self::Chat => "Chat",
            Self::Routing => "Routing",
            Self::Sinkhorn => "Sinkhorn",
            Self::State => "State",
            Self::Finetune => "Fine-tune",
            Self::Compare => "Compare",
        }
    }
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&v| v == self).unwrap_or(0)
    }
    /// The view `d` places further in Tab order (wrapping).
    pub fn step(self, d: isize) -> Self {
        let n = Self::ALL.len() as isize;
        Self::ALL[((self.index() as isize + d).rem_euclid(n)) as usize]
    }
}

/// What a key does in a view: changes the App, may send commands to the engine.
pub type KeyAction = fn(&mut App, KeyEvent, &mut Vec<Command>);

/// A view's key binding (help only until [`Binding::legend`] adds a legend word).
pub const fn bind(chords: &'static [Chord], help: &'static str, action: KeyAction) -> Binding<KeyAction> {
    Binding::new(chords, help, action)
}

/// What the UI reacts to.
#[derive(Debug, Clone)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    Mouse(MouseEvent),
    Resize(u16, u16),
    /// A timer tick (spinner, notice expiry).
    Tick,
    Engine(EngineEvent),
    /// A thread other than the UI's panicked (the panic hook's report): shown as an error.
    Panicked {
        thread: String,
        message: String,
    },
    /// The input thread ended (terminal error or panic): the UI cannot go on.
    InputClosed(String),
}

/// One chat message: text pieces, each tied to the position of the token that completed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMsg {
    pub role: Speaker,
    pub segments: Vec<(String, Option<usize>)>,
}

impl ChatMsg {
    pub fn new(role: Speaker, text: &str) -> Self {
        Self {
            role,
            segments: vec![(text.to_string(), None)],
        }
    }
    pub fn text(&self) -> String {
        self.segments.iter().map(|(t, _)| t.as_str()).collect()
    }
}

/// Where keys go in the chat view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFocus {
    Input,
    Sampling,
    /// The file-name prompt of save (`true`) or load (`false`).
    Path(bool),
    /// The system prompt field (Ctrl-G).
    System,
}

/// Chat view state.
#[derive(Debug, Clone)]
pub struct ChatState {
    pub messages: Vec<ChatMsg>,
    pub input: Editor,
    pub path: Editor,
    /// The system prompt of the current chat (sent with every new chat).
    pub system: Option<String>,
    /// The system prompt field while it is edited.
    pub system_input: Editor,
    /// Lines scrolled up from the bottom (0 = follow the newest text).
    pub scroll: usize,
    pub focus: ChatFocus,
    pub params: SamplingParams,
    pub param_sel: usize,
    /// Colour generated tokens by their expert in MoE slot `color_layer`.
    pub color_experts: bool,
    pub color_layer: usize,
}

impl Default for ChatState {
    fn default() -> Self {
        Self {
            messages: Vec::new(),
            input: Editor::default(),
            path: Editor::new("blackmamba-chat.json"),
            system: None,
            system_input: Editor::default(),
            scroll: 0,
            focus: ChatFocus::Input,
            params: SamplingParams::default(),
            param_sel: 0,
            color_experts: false,
            color_layer: 0,
        }
    }
}

/// A running generation.
#[derive(Debug, Clone)]
pub struct Busy {
    pub id: ReqId,
    pub cancel: CancelFlag,
    pub started_tick: u64,
}

/// A status-line message.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
    pub until_tick: u64,
}

/// Loading progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Loading {
    pub stage: String,
    pub done: usize,
    pub total: usize,
}

/// Sinkhorn view state.
#[derive(Debug, Clone)]
pub struct SinkhornState {
    pub window: usize,
    pub max_iters: usize,
    pub tol: f64,
    /// MoE slot shown in detail.
    pub layer: usize,
    pub chat: Option<Box<SinkhornReport>>,
    pub train: Option<Box<SinkhornReport>>,
    /// Show the training batch's Sinkhorn instead of the chat window's.
    pub show_train: bool,
}

impl Default for SinkhornState {
    fn default() -> Self {
        Self {
            window: 64,
            max_iters: 200,
            tol: 1e-4,
            layer: 0,
            chat: None,
            train: None,
            show_train: false,
        }
    }
}

/// Ticks per second of [`Msg::Tick`].
pub const TICKS_PER_SEC: u64 = 10;

/// Everything on screen.
#[derive(Debug, Clone)]
pub struct App {
    pub theme: Theme,
    pub view: View,
    pub help: bool,
    /// Lines the help screen is scrolled down.
    pub help_scroll: usize,
    pub quit: bool,
    pub model: Option<ModelInfo>,
    pub loading: Option<Loading>,
    pub fatal: Option<String>,
    pub notice: Option<Notice>,
    /// An informational notice that came while an error was shown: it waits for the error to go.
    pub deferred: Option<Notice>,
    /// A key was pressed since the current error notice came up (so it may be replaced).
    pub(crate) key_since_error: bool,
    pub chat: ChatState,
    pub tele: Telemetry,
    /// Routing view: selected token (index into `tele.tokens`, None = the newest) and its offset.
    pub routing_sel: Option<usize>,
    pub sink: SinkhornState,
    /// State view: selected Mamba slot.
    pub state_layer: usize,
    pub ft: FinetuneState,
    /// The compare view (F6) and the routing view's format comparison.
    pub cmp: CompareState,
    pub busy: Option<Busy>,
    pub stats: Option<(GenStats, StopReason)>,
    /// The model picker (Ctrl-K).
    pub picker: Picker,
    /// The name of the model being loaded in place of the current one.
    pub switching: Option<String>,
    pub tick: u64,
    next_id: ReqId,
}

impl App {
    pub fn new(theme: Theme) -> Self {
        Self {
            theme,
            view: View::Chat,
            help: false,
            help_scroll: 0,
            quit: false,
            model: None,
            loading: None,
            fatal: None,
            notice: None,
            deferred: None,
            key_since_error: false,
            chat: ChatState::default(),
            tele: Telemetry::default(),
            routing_sel: None,
            sink: SinkhornState::default(),
            state_layer: 0,
            ft: FinetuneState::default(),
            cmp: CompareState::default(),
            busy: None,
            stats: None,
            picker: Picker::default(),
            switching: None,
            tick: 0,
            next_id: 1,
        }
    }

    /// Shows a one-line message for a few seconds (errors for longer). A note that comes while an
    /// error is up, before any key was pressed, waits until the error's time is over rather than
    /// hiding it (a startup error is not wiped by "loaded ..." a moment later).
    pub fn notify(&mut self, text: impl Into<String>, error: bool) {
        let n = Notice {
            text: text.into(),
            error,
            until_tick: self.tick + Self::notice_secs(error) * TICKS_PER_SEC,
        };
        if !error && !self.key_since_error && self.notice.as_ref().is_some_and(|cur| cur.error) {
            self.deferred = Some(n);
        } else {
            self.key_since_error = false;
            self.deferred = None;
            self.notice = Some(n);
        }
    }

    fn notice_secs(error: bool) -> u64 {
        if error {
            15
        } else {
            5
        }
    }

    /// Advances the clock: expires the notice, bringing up a deferred one for its full time.
    pub(crate) fn advance_clock(&mut self) {
        self.tick += 1;
        if self.notice.as_ref().is_some_and(|n| n.until_tick <= self.tick) {
            self.notice = self.deferred.take().map(|mut n| {
                n.until_tick = self.tick + Self::notice_secs(n.error) * TICKS_PER_SEC;
                n
            });
        }
    }

    /// Number of MoE layers of the loaded model.
    pub fn moe_count(&self) -> usize {
        self.model.as_ref().map_or(0, |m| m.moe_layers.len())
    }

    /// Number of Mamba layers of the loaded model.
    pub fn mamba_count(&self) -> usize {
        self.model.as_ref().map_or(0, |m| m.mamba_layers.len())
    }

    /// Whether `?` should open help rather than type a character.
    pub(crate) fn typing(&self) -> bool {
        (self.view == View::Chat && (matches!(self.chat.focus, ChatFocus::Path(_) | ChatFocus::System) || !self.chat.input.text.is_empty()))
            || (self.view == View::Finetune && self.ft.editing.is_some())
    }

    /// Scrolls the current view (negative = up / older).
    pub(crate) fn scroll(&mut self, d: isize) {
        if self.help {
            self.help_scroll = self.help_scroll.saturating_add_signed(d);
            return;
        }
        match self.view {
            View::Chat => {
                self.chat.scroll = if d < 0 {
                    self.chat.scroll.saturating_add(d.unsigned_abs())
                } else {
                    self.chat.scroll.saturating_sub(d.unsigned_abs())
                };
            }
            View::Routing => self.move_token(d),
            View::Sinkhorn => self.sink.layer = step_in(self.sink.layer, d.signum(), self.moe_count()),
            View::State => self.state_layer = step_in(self.state_layer, d.signum(), self.mamba_count()),
            View::Finetune => self.ft.sel = step_in(self.ft.sel, d.signum(), crate::tui::finetune_state::FIELDS.len()),
            View::Compare => self.cmp.move_sel(d),
        }
    }

    pub(crate) fn move_token(&mut self, d: isize) {
        let n = self.tele.len();
        if n == 0 {
            self.routing_sel = None;
            return;
        }
        let cur = self.routing_sel.unwrap_or(n - 1).min(n - 1) as isize;
        let next = (cur + d).clamp(0, n as isize - 1) as usize;
        self.routing_sel = if next == n - 1 && d > 0 { None } else { Some(next) };
    }

    pub(crate) fn cancel(&mut self) {
        if let Some(b) = &self.busy {
            b.cancel.cancel();
        }
    }

    pub(crate) fn sinkhorn_cmd(&self) -> Command {
        Command::Sinkhorn {
            window: self.sink.window,
            max_iters: self.sink.max_iters,
            tol: self.sink.tol,
        }
    }

    pub(crate) fn new_request(&mut self) -> (ReqId, CancelFlag) {
        let id = self.next_id;
        self.next_id += 1;
        let cancel = CancelFlag::new();
        self.busy = Some(Busy {
            id,
            cancel: cancel.clone(),
            started_tick: self.tick,
        });
        (id, cancel)
    }

    pub(crate) fn ready(&mut self) -> bool {
        if self.fatal.is_some() {
            self.notify("the engine has stopped; quit with Ctrl-Q", true);
            false
        } else if let Some(name) = &self.switching {
            self.notify(format!("{name} is loading"), false);
            false
        } else if self.model.is_none() {
            self.notify("the model is still loading", false);
            false
        } else if self.busy.is_some() {
            self.notify("still generating; Esc stops it", false);
            false
        } else {
            true
        }
    }

    /// Another model replaced the old one: its conversation, telemetry and fine-tuning run are
    /// gone (the fine-tune form stays).
    pub(crate) fn model_switched(&mut self) {
        self.switching = None;
        self.chat.messages.clear();
        self.chat.scroll = 0;
        self.tele.clear();
        self.routing_sel = None;
        self.sink.chat = None;
        self.sink.train = None;
        self.sink.layer = 0;
        self.state_layer = 0;
        self.stats = None;
        self.cmp = CompareState::default();
        self.ft = FinetuneState {
            spec: self.ft.spec.clone(),
            ..FinetuneState::default()
        };
    }
}
