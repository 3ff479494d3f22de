//! The keys of each view, as shown in the legend line and the help screen (one source for both).

use crate::tui::app::View;

/// (keys, what they do) shown in the legend line of a view, most useful first.
pub fn legend(view: View) -> &'static [(&'static str, &'static str)] {
    match view {
        View::Chat => &[
            ("Enter", "send"),
            ("Alt-Enter", "newline"),
            ("Esc", "stop"),
            ("Ctrl-P", "sampling"),
            ("Ctrl-R", "regenerate"),
            ("Ctrl-Z", "undo"),
            ("Ctrl-N", "new"),
            ("Ctrl-S/O", "save/load"),
            ("Ctrl-E", "experts"),
            ("Tab", "views"),
            ("?", "help"),
            ("Ctrl-K", "model"),
        ],
        View::Routing => &[
            ("↑↓", "token"),
            ("PgUp/PgDn", "page"),
            ("Home/End", "first/newest"),
            ("Tab", "views"),
            ("?", "help"),
        ],
        View::Sinkhorn => &[
            ("←→", "layer"),
            ("+/-", "window"),
            ("r", "rerun"),
            ("t", "chat/training"),
            ("Tab", "views"),
            ("?", "help"),
        ],
        View::State => &[("←→", "layer"), ("Tab", "views"), ("?", "help")],
        View::Finetune => &[
            ("↑↓", "field"),
            ("←→", "change"),
            ("Enter", "edit"),
            ("s", "start"),
            ("p", "pause"),
            ("x", "stop"),
            ("w", "save"),
            ("u", "use tuned"),
            ("?", "help"),
        ],
    }
}

/// The legend line while the model picker is open.
pub const PICKER: &[(&str, &str)] = &[
    ("↑↓", "model"),
    ("Enter", "load"),
    ("Tab/←→", "device, dtype"),
    ("type", "folder or hub id"),
    ("Esc", "close"),
];

/// The help screen: (section, [(keys, description)]).
pub fn help() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![
        (
            "Everywhere",
            vec![
                ("Tab / Shift-Tab", "next / previous view: Chat, Routing, Sinkhorn, State, Fine-tune"),
                ("F1 … F5", "jump to a view"),
                ("Ctrl-K", "model picker: switch to another model"),
                ("Esc", "stop the generation (within one token); close a prompt"),
                ("Ctrl-C", "stop the generation, or quit when nothing runs"),
                ("Ctrl-Q", "quit"),
                ("mouse wheel", "scroll the view"),
                ("?", "this help"),
            ],
        ),
        (
            "Chat",
            vec![
                ("Enter", "send the message"),
                ("Alt-Enter, Shift-Enter, Ctrl-J", "new line in the message"),
                ("↑↓ PgUp PgDn", "move in the message / scroll the history"),
                ("Ctrl-P", "sampling panel: ↑↓ pick, ←→ change, Esc back"),
                ("Ctrl-R", "regenerate the last answer (from the saved state)"),
                ("Ctrl-Z", "undo the last turn (restores the state)"),
                ("Ctrl-N", "new chat"),
                ("Ctrl-S / Ctrl-O", "save / load the conversation (JSON with state snapshots)"),
                ("Ctrl-E / Ctrl-L", "colour tokens by expert / pick the MoE layer"),
                ("Ctrl-U", "clear the message"),
            ],
        ),
        (
            "Routing: which expert each token went to, per MoE layer",
            vec![
                ("↑↓ PgUp PgDn Home End", "select a token; the right side shows its experts"),
                ("", "cells: expert id on its colour; loads, CV, entropy, busiest share, stickiness"),
            ],
        ),
        (
            "Sinkhorn: balanced routing of the last N tokens",
            vec![
                ("←→", "MoE layer"),
                ("+ / -", "window N (doubles / halves)"),
                ("r", "run again"),
                ("t", "show the chat window or the last training batch"),
            ],
        ),
        (
            "State: Mamba state norms over positions",
            vec![("←→", "Mamba layer of the line charts")],
        ),
        (
            "Fine-tune",
            vec![
                ("↑↓ ←→ Enter", "pick a field, change it, type a path"),
                ("s p x", "start, pause/resume, stop"),
                ("w", "save the adapter"),
                ("u", "chat with the fine-tuned / base weights"),
            ],
        ),
        (
            "Model picker (Ctrl-K)",
            vec![
                ("↑↓ Enter", "load the selected model (a new chat starts on it)"),
                ("Tab ←→", "device and dtype to load on"),
                ("typing", "a folder, owner/name[@revision] or random:SHAPE[@seed]"),
                ("Esc", "close; the current model stays"),
            ],
        ),
    ]
}
