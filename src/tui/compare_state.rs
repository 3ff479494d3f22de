//! The compare view's state: the engine's last [`CompareReport`], whether one is being made, the
//! selected token, and the routing view's "compare with bf16" toggle. The requests
//! ([`Command::Compare`]) are built here from the chat's text and the picker's weight format.

use crate::engine::compare::CompareReport;
use crate::engine::protocol::{Command, CompareWith};
use crate::quant::QuantFormat;
use crate::tui::app::App;
use crate::tui::keymap::step_in;

/// Compare view state.
#[derive(Debug, Clone, Default)]
pub struct CompareState {
    pub report: Option<Box<CompareReport>>,
    /// What a running comparison compares with (None: nothing runs).
    pub pending: Option<String>,
    /// The selected token of model A.
    pub sel: usize,
    /// The routing view shows the flips of the last weight-format comparison per layer.
    pub in_routing: bool,
    /// Model B of the last request (`r` runs it again).
    pub last: Option<CompareWith>,
}

impl CompareState {
    /// Takes the engine's report; the selection stays where it was when it still fits.
    pub fn set_report(&mut self, r: Box<CompareReport>) {
        self.pending = None;
        self.sel = self.sel.min(r.a.pieces.len().saturating_sub(1));
        self.report = Some(r);
    }

    /// Moves the selected token by `d` (clamped).
    pub fn move_sel(&mut self, d: isize) {
        let n = self.report.as_ref().map_or(0, |r| r.a.pieces.len());
        self.sel = step_in(self.sel, d, n);
    }

    /// The last report when it compares the chat's model with itself in another format.
    pub fn format_report(&self) -> Option<&CompareReport> {
        self.report.as_deref().filter(|r| r.same_model)
    }
}

/// The chat's text as the models read it again: every message, one after another (blank when the
/// chat is empty: the engine then takes a built-in paragraph).
pub fn chat_text(app: &App) -> String {
    app.chat.messages.iter().map(|m| m.text()).collect::<Vec<_>>().join("\n\n")
}

/// What "compare with another format" means for the loaded model: a quantised model against its
/// dense weights, a dense one against the picker's format (int8 unless another is chosen).
pub fn format_target(app: &App) -> (CompareWith, String) {
    let quantised = app.model.as_ref().and_then(|m| m.quant.clone());
    match quantised {
        Some(_) => {
            let dense = app.model.as_ref().map_or_else(|| "dense".to_string(), |m| m.dtype.clone());
            (CompareWith::Format(None), dense)
        }
        None => {
            let format = app.picker.format.unwrap_or(QuantFormat::Int8);
            let spec = app.picker.quant_spec(format);
            (CompareWith::Format(Some(spec)), format.name())
        }
    }
}

/// Sends a comparison with `with` (named `what` in the status line) over the chat's text.
pub fn request(app: &mut App, with: CompareWith, what: String, out: &mut Vec<Command>) {
    if app.cmp.pending.is_some() {
        app.notify("a comparison is running; its result comes to the Compare view (F6)", false);
        return;
    }
    if !app.ready() {
        return;
    }
    app.notify(format!("comparing with {what}…"), false);
    app.cmp.pending = Some(what);
    app.cmp.last = Some(with.clone());
    out.push(Command::Compare {
        text: chat_text(app),
        with,
    });
}
