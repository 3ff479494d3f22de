//! [`App::update`]: messages in, engine commands out. Keys go through the tables: first the ones
//! that work everywhere ([`ALWAYS_KEYS`], [`GLOBAL_KEYS`]), then the open overlay's (help, model
//! picker), then the current view's, which live in the view's own module.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, MouseEvent, MouseEventKind};

use crate::chat_template::Role as Speaker;
use crate::engine::protocol::{Command, EngineEvent, FinetuneEvent, ReqId, SinkhornOrigin};
use crate::generate::StopReason;
use crate::tui::app::{App, Busy, ChatFocus, ChatMsg, Loading, Msg, View};
use crate::tui::keymap::{find, section, Binding, Chord, Section};
use crate::tui::views;

/// A key handler that may pass the key on (false) to the view.
pub type GlobalAction = fn(&mut App, KeyEvent, &mut Vec<Command>) -> bool;

const fn global(chords: &'static [Chord], help: &'static str, action: GlobalAction) -> Binding<GlobalAction> {
    Binding::new(chords, help, action)
}

const fn help_key(chords: &'static [Chord], help: &'static str, action: fn(&mut App)) -> Binding<fn(&mut App)> {
    Binding::new(chords, help, action)
}

/// Keys that work even over the help and the model picker.
pub const ALWAYS_KEYS: &[Binding<GlobalAction>] = &[
    global(&[Chord::ctrl('q')], "quit", |app, _, _| {
        app.cancel();
        app.quit = true;
        true
    }),
    global(
        &[Chord::ctrl('c')],
        "stop the generation, or quit when nothing runs",
        |app, _, _| {
            if app.busy.is_some() {
                app.cancel();
            } else {
                app.quit = true;
            }
            true
        },
    ),
];

/// Keys of every view (unless the view is typing into a field).
pub const GLOBAL_KEYS: &[Binding<GlobalAction>] = &[
    global(
        &[Chord::key(KeyCode::Tab)],
        "next view: Chat, Routing, Sinkhorn, State, Fine-tune, Compare",
        |app, _, out| app.ft.editing.is_none() && go(app, app.view.step(1), out),
    )
    .legend("views"),
    global(&[Chord::key(KeyCode::BackTab)], "previous view", |app, _, out| {
        app.ft.editing.is_none() && go(app, app.view.step(-1), out)
    }),
    global(
        &[
            Chord::key(KeyCode::F(1)),
            Chord::key(KeyCode::F(2)),
            Chord::key(KeyCode::F(3)),
            Chord::key(KeyCode::F(4)),
            Chord::key(KeyCode::F(5)),
            Chord::key(KeyCode::F(6)),
        ],
        "jump to a view",
        |app, k, out| match k.code {
            KeyCode::F(n @ 1..=6) => go(app, View::ALL[usize::from(n) - 1], out),
            _ => false,
        },
    ),
    global(&[Chord::ch('?')], "this help (when not typing)", |app, _, _| {
        if app.typing() {
            return false;
        }
        app.help = true;
        app.help_scroll = 0;
        true
    })
    .legend("help"),
    global(&[Chord::ctrl('k')], "model picker: switch to another model", |app, _, out| {
        views::picker::open(app, out);
        true
    })
    .legend("model"),
    global(
        &[Chord::key(KeyCode::Esc)],
        "stop the generation (within one token or prompt chunk)",
        |app, _, _| {
            if app.busy.is_none() {
                return false;
            }
            app.cancel();
            true
        },
    ),
];

/// Keys while the help is shown; any other key closes it.
const HELP_KEYS: &[Binding<fn(&mut App)>] = &[
    help_key(&[Chord::key(KeyCode::Up), Chord::ch('k')], "scroll up", |a| {
        a.help_scroll = a.help_scroll.saturating_sub(1);
    }),
    help_key(&[Chord::key(KeyCode::Down), Chord::ch('j')], "scroll down", |a| a.help_scroll += 1),
    help_key(&[Chord::key(KeyCode::PageUp)], "page up", |a| {
        a.help_scroll = a.help_scroll.saturating_sub(10);
    }),
    help_key(&[Chord::key(KeyCode::PageDown), Chord::ch(' ')], "page down", |a| {
        a.help_scroll += 10
    }),
    help_key(&[Chord::key(KeyCode::Home), Chord::ch('g')], "the top", |a| a.help_scroll = 0),
    // the help screen stops at its last page
    help_key(&[Chord::key(KeyCode::End), Chord::ch('G')], "the end", |a| {
        a.help_scroll = usize::MAX / 2
    }),
];

/// Switches to view `v`; the Sinkhorn view runs on what the chat has so far.
fn go(app: &mut App, v: View, out: &mut Vec<Command>) -> bool {
    app.view = v;
    if v == View::Sinkhorn && app.model.is_some() && app.fatal.is_none() {
        out.push(app.sinkhorn_cmd());
    }
    true
}

/// The help section of the keys that work everywhere.
pub fn everywhere() -> Section {
    let mut s = section("Everywhere", GLOBAL_KEYS, &[]);
    s.lines
        .extend(section("", ALWAYS_KEYS, &[("mouse wheel", "scroll the view")]).lines);
    s
}

/// The help section of the help screen itself.
pub fn help_section() -> Section {
    section("This help", HELP_KEYS, &[("any other key", "close the help")])
}

impl App {
    /// Applies a message; returns the commands for the engine.
    pub fn update(&mut self, msg: Msg) -> Vec<Command> {
        let mut out = Vec::new();
        match msg {
            Msg::Tick => self.advance_clock(),
            Msg::Resize(..) => {}
            Msg::Paste(text) => self.paste(&text),
            Msg::Mouse(m) => self.mouse(m),
            Msg::Key(k) => {
                self.key_since_error = true;
                self.key(k, &mut out);
            }
            Msg::Engine(ev) => self.engine(ev, &mut out),
            Msg::Panicked { thread, message } => self.notify(format!("the {thread} thread panicked: {message}"), true),
            Msg::InputClosed(why) => {
                self.notify(format!("the terminal input stopped ({why})"), true);
                self.quit = true;
            }
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
            (View::Chat, ChatFocus::System) => self.chat.system_input.insert(text),
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

    fn key(&mut self, k: KeyEvent, out: &mut Vec<Command>) {
        if k.kind == KeyEventKind::Release {
            return;
        }
        if let Some(b) = find(ALWAYS_KEYS, &k) {
            if (b.action)(self, k, out) {
                return;
            }
        }
        if self.help {
            match find(HELP_KEYS, &k) {
                Some(b) => (b.action)(self),
                None => self.help = false,
            }
            return;
        }
        if self.picker.open {
            views::picker::key(self, k, out);
            return;
        }
        if let Some(b) = find(GLOBAL_KEYS, &k) {
            if (b.action)(self, k, out) {
                return;
            }
        }
        match self.view {
            View::Chat => views::chat::key(self, k, out),
            View::Routing => views::routing::key(self, k, out),
            View::Sinkhorn => views::sinkhorn::key(self, k, out),
            View::State => views::state::key(self, k, out),
            View::Finetune => views::finetune::key(self, k, out),
            View::Compare => views::compare::key(self, k, out),
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
                    // the new model's chat starts with the same system prompt
                    if self.chat.system.is_some() {
                        out.push(Command::NewChat {
                            system: self.chat.system.clone(),
                        });
                    }
                }
                let mut text = format!("loaded {} in {:.1} s", info.label, info.load_secs);
                for n in &info.notes {
                    text.push_str("; note: ");
                    text.push_str(n);
                }
                self.notify(text, false);
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
                self.chat.system.clone_from(&info.system);
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
            EngineEvent::Compare(r) => {
                self.loading = None;
                let what = format!("compared with {}: see the Compare view (F6)", r.b.label);
                self.cmp.set_report(r);
                self.notify(what, false);
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
                if self.cmp.pending.take().is_some() {
                    self.loading = None;
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
