//! The App: all UI state, changed only by [`App::update`]; views draw it without changing it.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEvent, MouseEventKind};

use crate::chat_template::Role as Speaker;
use crate::engine::protocol::{
    CancelFlag, Command, EngineEvent, FinetuneCommand, FinetuneEvent, ModelInfo, ReqId, SinkhornOrigin, SinkhornReport,
};
use crate::generate::{GenStats, StopReason};
use crate::sampling::SamplingParams;
use crate::tui::finetune_state::FinetuneState;
use crate::tui::picker::Picker;
use crate::tui::store::Telemetry;
use crate::tui::text::Editor;
use crate::tui::theme::Theme;

/// The five views, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Chat,
    Routing,
    Sinkhorn,
    State,
    Finetune,
}

impl View {
    pub const ALL: [Self; 5] = [Self::Chat, Self::Routing, Self::Sinkhorn, Self::State, Self::Finetune];
    pub fn title(self) -> &'static str {
        match self {
            Self::Chat => "Chat",
            Self::Routing => "Routing",
            Self::Sinkhorn => "Sinkhorn",
            Self::State => "State",
            Self::Finetune => "Fine-tune",
        }
    }
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&v| v == self).unwrap_or(0)
    }
    fn step(self, d: isize) -> Self {
        let n = Self::ALL.len() as isize;
        Self::ALL[((self.index() as isize + d).rem_euclid(n)) as usize]
    }
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
}

/// The sampling parameters the panel edits, in order.
pub const SAMPLING_FIELDS: [&str; 7] = ["temperature", "top-k", "top-p", "min-p", "repeat penalty", "seed", "max tokens"];

/// Chat view state.
#[derive(Debug, Clone)]
pub struct ChatState {
    pub messages: Vec<ChatMsg>,
    pub input: Editor,
    pub path: Editor,
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
    pub chat: ChatState,
    pub tele: Telemetry,
    /// Routing view: selected token (index into `tele.tokens`, None = the newest) and its offset.
    pub routing_sel: Option<usize>,
    pub sink: SinkhornState,
    /// State view: selected Mamba slot.
    pub state_layer: usize,
    pub ft: FinetuneState,
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
            chat: ChatState::default(),
            tele: Telemetry::default(),
            routing_sel: None,
            sink: SinkhornState::default(),
            state_layer: 0,
            ft: FinetuneState::default(),
            busy: None,
            stats: None,
            picker: Picker::default(),
            switching: None,
            tick: 0,
            next_id: 1,
        }
    }

    /// Shows a one-line message for a few seconds (errors for longer).
    pub fn notify(&mut self, text: impl Into<String>, error: bool) {
        let secs = if error { 15 } else { 5 };
        self.notice = Some(Notice {
            text: text.into(),
            error,
            until_tick: self.tick + secs * TICKS_PER_SEC,
        });
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
    fn typing(&self) -> bool {
        (self.view == View::Chat && (matches!(self.chat.focus, ChatFocus::Path(_)) || !self.chat.input.text.is_empty()))
            || (self.view == View::Finetune && self.ft.editing.is_some())
    }

    /// Applies a message; returns the commands for the engine.
    pub fn update(&mut self, msg: Msg) -> Vec<Command> {
        let mut out = Vec::new();
        match msg {
            Msg::Tick => {
                self.tick += 1;
                if self.notice.as_ref().is_some_and(|n| n.until_tick <= self.tick) {
                    self.notice = None;
                }
            }
            Msg::Resize(..) => {}
            Msg::Paste(text) => self.paste(&text),
            Msg::Mouse(m) => self.mouse(m),
            Msg::Key(k) => self.key(k, &mut out),
            Msg::Engine(ev) => self.engine(ev, &mut out),
        }
        out
    }

    fn paste(&mut self, text: &str) {
        if self.picker.open {
            self.picker.paste(text);
            return;
        }
        match (self.view, self.chat.focus) {
            (View::Chat, ChatFocus::Path(_)) => self.chat.path.insert(&text.replace(['\n', '\r'], "")),
            (View::Chat, _) => {
                self.chat.focus = ChatFocus::Input;
                self.chat.input.insert(text);
            }
            (View::Finetune, _) => {
                if let Some(e) = self.ft.editing.as_mut() {
                    e.insert(&text.replace(['\n', '\r'], ""));
                }
            }
            _ => {}
        }
    }

    fn mouse(&mut self, m: MouseEvent) {
        let up = match m.kind {
            MouseEventKind::ScrollUp => true,
            MouseEventKind::ScrollDown => false,
            _ => return,
        };
        if self.picker.open {
            self.picker.scroll(if up { -1 } else { 1 });
            return;
        }
        self.scroll(if up { -3 } else { 3 });
    }

    /// Scrolls the current view (negative = up / older).
    fn scroll(&mut self, d: isize) {
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
        }
    }

    fn move_token(&mut self, d: isize) {
        let n = self.tele.len();
        if n == 0 {
            self.routing_sel = None;
            return;
        }
        let cur = self.routing_sel.unwrap_or(n - 1).min(n - 1) as isize;
        let next = (cur + d).clamp(0, n as isize - 1) as usize;
        self.routing_sel = if next == n - 1 && d > 0 { None } else { Some(next) };
    }

    fn key(&mut self, k: KeyEvent, out: &mut Vec<Command>) {
        if k.kind == KeyEventKind::Release {
            return;
        }
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        // global keys
        match k.code {
            KeyCode::Char('q') if ctrl => {
                self.cancel();
                self.quit = true;
                return;
            }
            KeyCode::Char('c') if ctrl => {
                if self.busy.is_some() {
                    self.cancel();
                } else {
                    self.quit = true;
                }
                return;
            }
            _ => {}
        }
        if self.help {
            match k.code {
                KeyCode::Up | KeyCode::Char('k') => self.help_scroll = self.help_scroll.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => self.help_scroll += 1,
                KeyCode::PageUp => self.help_scroll = self.help_scroll.saturating_sub(10),
                KeyCode::PageDown | KeyCode::Char(' ') => self.help_scroll += 10,
                _ => self.help = false,
            }
            return;
        }
        if self.picker.open {
            self.picker_key(k, out);
            return;
        }
        if k.code == KeyCode::Char('k') && ctrl {
            self.open_picker(out);
            return;
        }
        let goto = match k.code {
            KeyCode::Tab if self.ft.editing.is_none() => Some(self.view.step(1)),
            KeyCode::BackTab if self.ft.editing.is_none() => Some(self.view.step(-1)),
            KeyCode::F(n @ 1..=5) => Some(View::ALL[usize::from(n) - 1]),
            _ => None,
        };
        if let Some(v) = goto {
            self.view = v;
            // the Sinkhorn view runs on what the chat has so far (after the current answer)
            if v == View::Sinkhorn && self.model.is_some() && self.fatal.is_none() {
                out.push(self.sinkhorn_cmd());
            }
            return;
        }
        match k.code {
            KeyCode::Char('?') if !self.typing() => {
                self.help = true;
                self.help_scroll = 0;
                return;
            }
            KeyCode::Esc if self.busy.is_some() => {
                self.cancel();
                return;
            }
            _ => {}
        }
        match self.view {
            View::Chat => self.chat_key(k, out),
            View::Routing => match k.code {
                KeyCode::Up | KeyCode::Char('k') => self.move_token(-1),
                KeyCode::Down | KeyCode::Char('j') => self.move_token(1),
                KeyCode::PageUp => self.move_token(-20),
                KeyCode::PageDown => self.move_token(20),
                KeyCode::Home | KeyCode::Char('g') => self.move_token(-(self.tele.len() as isize)),
                KeyCode::End | KeyCode::Char('G') => self.routing_sel = None,
                _ => {}
            },
            View::Sinkhorn => match k.code {
                KeyCode::Left | KeyCode::Char('h') => self.sink.layer = step_in(self.sink.layer, -1, self.moe_count()),
                KeyCode::Right | KeyCode::Char('l') => self.sink.layer = step_in(self.sink.layer, 1, self.moe_count()),
                KeyCode::Char('+' | '=') | KeyCode::Up => {
                    self.sink.window = (self.sink.window * 2).min(4096);
                    out.push(self.sinkhorn_cmd());
                }
                KeyCode::Char('-') | KeyCode::Down => {
                    self.sink.window = (self.sink.window / 2).max(4);
                    out.push(self.sinkhorn_cmd());
                }
                KeyCode::Char('r') => out.push(self.sinkhorn_cmd()),
                KeyCode::Char('t') => self.sink.show_train = !self.sink.show_train,
                _ => {}
            },
            View::State => match k.code {
                KeyCode::Left | KeyCode::Char('h') | KeyCode::Up => self.state_layer = step_in(self.state_layer, -1, self.mamba_count()),
                KeyCode::Right | KeyCode::Char('l') | KeyCode::Down => {
                    self.state_layer = step_in(self.state_layer, 1, self.mamba_count());
                }
                _ => {}
            },
            View::Finetune => {
                if let Some(c) = self.ft.key(k) {
                    if matches!(c, FinetuneCommand::Start(_)) {
                        self.ft.history.clear();
                        self.ft.probe_before = None;
                        self.ft.probe_after = None;
                        self.ft.saved = None;
                    }
                    self.ft.awaiting = true;
                    out.push(Command::Finetune(c));
                }
            }
        }
    }

    fn cancel(&mut self) {
        if let Some(b) = &self.busy {
            b.cancel.cancel();
        }
    }

    fn sinkhorn_cmd(&self) -> Command {
        Command::Sinkhorn {
            window: self.sink.window,
            max_iters: self.sink.max_iters,
            tol: self.sink.tol,
        }
    }

    fn new_request(&mut self) -> (ReqId, CancelFlag) {
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

    fn chat_key(&mut self, k: KeyEvent, out: &mut Vec<Command>) {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.contains(KeyModifiers::ALT);
        let shift = k.modifiers.contains(KeyModifiers::SHIFT);
        match self.chat.focus {
            ChatFocus::Path(save) => match k.code {
                KeyCode::Esc => self.chat.focus = ChatFocus::Input,
                KeyCode::Enter => {
                    self.chat.focus = ChatFocus::Input;
                    let p = std::path::PathBuf::from(self.chat.path.text.trim());
                    if p.as_os_str().is_empty() {
                        self.notify("no file name given", true);
                    } else if self.ready() {
                        out.push(if save { Command::SaveChat(p) } else { Command::LoadChat(p) });
                    }
                }
                _ => edit_line(&mut self.chat.path, k),
            },
            ChatFocus::Sampling => match k.code {
                KeyCode::Esc | KeyCode::Enter => self.chat.focus = ChatFocus::Input,
                KeyCode::Char('p') if ctrl => self.chat.focus = ChatFocus::Input,
                KeyCode::Up | KeyCode::Char('k') => self.chat.param_sel = step_in(self.chat.param_sel, -1, SAMPLING_FIELDS.len()),
                KeyCode::Down | KeyCode::Char('j') => self.chat.param_sel = step_in(self.chat.param_sel, 1, SAMPLING_FIELDS.len()),
                KeyCode::Left | KeyCode::Char('-' | 'h') => adjust(&mut self.chat.params, self.chat.param_sel, -1.0),
                KeyCode::Right | KeyCode::Char('+' | '=' | 'l') => adjust(&mut self.chat.params, self.chat.param_sel, 1.0),
                _ => {}
            },
            ChatFocus::Input => match k.code {
                KeyCode::Enter if alt || shift => self.chat.input.insert("\n"),
                KeyCode::Char('j') if ctrl => self.chat.input.insert("\n"),
                KeyCode::Enter => {
                    if self.chat.input.is_blank() || !self.ready() {
                        return;
                    }
                    let text = self.chat.input.take();
                    let (id, cancel) = self.new_request();
                    self.chat.scroll = 0;
                    out.push(Command::Chat {
                        id,
                        text: text.trim().to_string(),
                        params: self.chat.params.clone(),
                        cancel,
                    });
                }
                KeyCode::Char('p') if ctrl => self.chat.focus = ChatFocus::Sampling,
                KeyCode::Char('r') if ctrl => {
                    if self.ready() {
                        if self.chat.messages.iter().all(|m| m.role != Speaker::Assistant) {
                            self.notify("nothing to regenerate yet", false);
                            return;
                        }
                        let (id, cancel) = self.new_request();
                        out.push(Command::Regenerate {
                            id,
                            params: self.chat.params.clone(),
                            cancel,
                        });
                    }
                }
                KeyCode::Char('z') if ctrl => {
                    if self.ready() {
                        out.push(Command::Undo);
                    }
                }
                KeyCode::Char('n') if ctrl => {
                    if self.ready() {
                        out.push(Command::NewChat { system: None });
                        self.stats = None;
                    }
                }
                KeyCode::Char('s') if ctrl => self.chat.focus = ChatFocus::Path(true),
                KeyCode::Char('o') if ctrl => self.chat.focus = ChatFocus::Path(false),
                KeyCode::Char('e') if ctrl => self.chat.color_experts = !self.chat.color_experts,
                KeyCode::Char('l') if ctrl => {
                    self.chat.color_layer = step_in(self.chat.color_layer, 1, self.moe_count().max(1));
                    self.chat.color_experts = true;
                }
                KeyCode::Char('u') if ctrl => self.chat.input.clear(),
                KeyCode::PageUp => self.scroll(-10),
                KeyCode::PageDown => self.scroll(10),
                KeyCode::Up => {
                    if !self.chat.input.up() {
                        self.scroll(-1);
                    }
                }
                KeyCode::Down => {
                    if !self.chat.input.down() {
                        self.scroll(1);
                    }
                }
                _ => edit_line(&mut self.chat.input, k),
            },
        }
    }

    fn engine(&mut self, ev: EngineEvent, out: &mut Vec<Command>) {
        let current = |id: ReqId, busy: &Option<Busy>| busy.as_ref().is_some_and(|b| b.id == id);
        match ev {
            EngineEvent::LoadProgress { stage, done, total } => self.loading = Some(Loading { stage, done, total }),
            EngineEvent::Loaded(info) => {
                self.loading = None;
                if self.model.is_some() {
                    self.model_switched();
                }
                self.notify(format!("loaded {} in {:.1} s", info.label, info.load_secs), false);
                self.chat.color_layer = self.chat.color_layer.min(info.moe_layers.len().saturating_sub(1));
                self.model = Some(*info);
            }
            EngineEvent::TurnStarted { id, user } => {
                if current(id, &self.busy) {
                    self.chat.messages.push(ChatMsg::new(Speaker::User, &user));
                    self.chat.messages.push(ChatMsg {
                        role: Speaker::Assistant,
                        segments: Vec::new(),
                    });
                }
            }
            EngineEvent::Prompt { id, tokens } => {
                if current(id, &self.busy) {
                    tokens.into_iter().for_each(|t| self.tele.push(t));
                }
            }
            EngineEvent::Token { id, text, rec } => {
                if current(id, &self.busy) {
                    if let Some(m) = self.chat.messages.last_mut().filter(|m| m.role == Speaker::Assistant) {
                        m.segments.push((text, Some(rec.pos)));
                    }
                    self.tele.push(*rec);
                }
            }
            EngineEvent::Tail { id, text } => {
                if current(id, &self.busy) {
                    if let Some(m) = self.chat.messages.last_mut().filter(|m| m.role == Speaker::Assistant) {
                        m.segments.push((text, None));
                    }
                }
            }
            EngineEvent::Done { id, stats, stop } => {
                if current(id, &self.busy) {
                    self.busy = None;
                    self.stats = Some((stats, stop));
                    if stop == StopReason::Cancelled {
                        self.notify("stopped", false);
                    }
                    out.push(self.sinkhorn_cmd());
                }
            }
            EngineEvent::Rewound { pos, turns } => {
                let keep = self.chat.messages.iter().take_while(|m| m.role == Speaker::System).count() + 2 * turns;
                self.chat.messages.truncate(keep);
                self.tele.truncate(pos);
                if self.routing_sel.is_some_and(|s| s >= self.tele.len()) {
                    self.routing_sel = None;
                }
                if pos == 0 && turns == 0 {
                    self.sink.chat = None;
                }
            }
            EngineEvent::Conversation(info) => {
                self.chat.messages.clear();
                if let Some(s) = &info.system {
                    self.chat.messages.push(ChatMsg::new(Speaker::System, s));
                }
                for (u, a) in &info.turns {
                    self.chat.messages.push(ChatMsg::new(Speaker::User, u));
                    self.chat.messages.push(ChatMsg::new(Speaker::Assistant, a));
                }
                self.tele.clear();
                self.routing_sel = None;
                self.chat.scroll = 0;
                self.sink.chat = None;
            }
            EngineEvent::Sinkhorn(r) => match r.origin {
                SinkhornOrigin::Chat => self.sink.chat = Some(r),
                SinkhornOrigin::Finetune { .. } => self.sink.train = Some(r),
            },
            EngineEvent::Finetune(ev) => {
                self.ft.awaiting = false;
                match &ev {
                    FinetuneEvent::Saved(p) => self.notify(format!("saved the adapter to {}", p.display()), false),
                    FinetuneEvent::Failed(m) => self.notify(m.clone(), true),
                    _ => {}
                }
                self.ft.apply(ev);
            }
            EngineEvent::LoadFailed(message) => {
                self.switching = None;
                self.loading = None;
                self.notify(message, true);
            }
            EngineEvent::Models(c) => {
                let label = self.model.as_ref().map(|m| m.label.clone());
                self.picker.set_catalog(c, label.as_deref());
            }
            EngineEvent::Notice(s) => self.notify(s, false),
            EngineEvent::Error { id, message } => {
                if id.is_some_and(|id| current(id, &self.busy)) {
                    self.busy = None;
                }
                if self.ft.awaiting {
                    self.ft.awaiting = false;
                    self.ft.message = Some(message.clone());
                }
                self.notify(message, true);
            }
            EngineEvent::Fatal(message) => {
                self.busy = None;
                self.loading = None;
                self.fatal = Some(message);
            }
        }
    }
}

/// Moves `i` by `d` within `0..n` (clamped).
pub fn step_in(i: usize, d: isize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (i as isize + d).clamp(0, n as isize - 1) as usize
}

/// Text editing keys shared by the inputs.
pub fn edit_line(e: &mut Editor, k: KeyEvent) {
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    match k.code {
        KeyCode::Char(c) if !ctrl => e.insert(c.encode_utf8(&mut [0; 4])),
        KeyCode::Backspace => e.backspace(),
        KeyCode::Delete => e.delete(),
        KeyCode::Left => e.left(),
        KeyCode::Right => e.right(),
        KeyCode::Home => e.home(),
        KeyCode::End => e.end(),
        KeyCode::Char('a') if ctrl => e.home(),
        KeyCode::Char('e') if ctrl => e.end(),
        _ => {}
    }
}

/// Changes sampling field `i` by one step in direction `d`.
fn adjust(p: &mut SamplingParams, i: usize, d: f64) {
    let round = |x: f64, q: f64| (x / q).round() * q;
    match i {
        0 => p.temperature = round((p.temperature + 0.1 * d).clamp(0.0, 5.0), 0.01),
        1 => p.top_k = (p.top_k as i64 + 5 * d as i64).clamp(0, 500) as usize,
        2 => p.top_p = round((p.top_p + 0.05 * d).clamp(0.05, 1.0), 0.01),
        3 => p.min_p = round((p.min_p + 0.01 * d).clamp(0.0, 0.5), 0.01),
        4 => p.repeat_penalty = (f64::from(p.repeat_penalty) + 0.05 * d).clamp(1.0, 2.0).mul_add(100.0, 0.0).round() as f32 / 100.0,
        5 => p.seed = p.seed.wrapping_add_signed(d as i64),
        _ => p.max_tokens = (p.max_tokens as i64 + 32 * d as i64).clamp(1, 8192) as usize,
    }
}

/// The value of sampling field `i`, for the panel.
pub fn sampling_value(p: &SamplingParams, i: usize) -> String {
    match i {
        0 => format!("{:.2}", p.temperature),
        1 => format!("{}", p.top_k),
        2 => format!("{:.2}", p.top_p),
        3 => format!("{:.2}", p.min_p),
        4 => format!("{:.2}", p.repeat_penalty),
        5 => format!("{}", p.seed),
        _ => format!("{}", p.max_tokens),
    }
}
