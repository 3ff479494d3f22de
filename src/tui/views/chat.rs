//! The chat view: the conversation (streaming, scrollable, optionally coloured by expert), the
//! message input, the file and system prompts and the sampling panel; and their keys.

use crossterm::event::{KeyCode, KeyEvent};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use crate::chat_template::Role as Speaker;
use crate::engine::protocol::Command;
use crate::sampling::SamplingParams;
use crate::tui::app::{bind, App, ChatFocus, KeyAction};
use crate::tui::editor::{edit, Editor};
use crate::tui::keymap::{find, section, step_in, Binding, Chord, Section};
use crate::tui::text::{sanitize, wrap};
use crate::tui::theme::Role;
use crate::tui::widgets::{framed, lines, put};

/// The sampling parameters the panel edits, in order.
pub const SAMPLING_FIELDS: [&str; 7] = ["temperature", "top-k", "top-p", "min-p", "repeat penalty", "seed", "max tokens"];

/// Spinner frames.
pub const SPINNER: [&str; 4] = ["◐", "◓", "◑", "◒"];

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let show_panel = area.width >= 72 && area.height >= 8;
    let [main, panel] = if show_panel {
        Layout::horizontal([Constraint::Min(30), Constraint::Length(24)]).areas(area)
    } else {
        [area, Rect::default()]
    };
    let input_h = if main.height >= 8 {
        (app.chat.input.lines().min(5) as u16 + 2).min(main.height / 2)
    } else {
        u16::from(main.height >= 2)
    };
    let [hist, input] = Layout::vertical([Constraint::Min(1), Constraint::Length(input_h)]).areas(main);
    let focused_input = matches!(app.chat.focus, ChatFocus::Input | ChatFocus::Path(_) | ChatFocus::System);
    // below 5 rows the frame would leave no room for the text
    let inner = if hist.height >= 5 {
        framed(app, "Chat", false, hist, buf)
    } else {
        hist
    };
    history(app, inner, buf);
    let ed = match app.chat.focus {
        ChatFocus::Path(_) => &app.chat.path,
        ChatFocus::System => &app.chat.system_input,
        _ => &app.chat.input,
    };
    if input.height >= 3 {
        let title = match app.chat.focus {
            ChatFocus::Path(true) => "Save conversation to (Enter saves, Esc cancels)",
            ChatFocus::Path(false) => "Load conversation from (Enter loads, Esc cancels)",
            ChatFocus::System => "System prompt (Enter starts a new chat with it, Esc cancels)",
            _ => "Message",
        };
        let inner = framed(app, title, focused_input, input, buf);
        editor(app, ed, focused_input, inner, buf);
    } else if input.height == 1 {
        // no room for a frame: a one-line prompt
        put(buf, input, input.x, input.y, "› ", app.theme.style(Role::Accent));
        let rest = Rect::new(input.x.saturating_add(2), input.y, input.width.saturating_sub(2), 1);
        editor(app, ed, focused_input, rest, buf);
    }
    if show_panel {
        sampling(app, panel, buf);
    }
}

/// The wrapped conversation lines for width `w`.
pub fn history_lines(app: &App, w: usize) -> Vec<Line<'static>> {
    let t = &app.theme;
    let mut out: Vec<Line<'static>> = Vec::new();
    if app.chat.messages.is_empty() {
        let hint = if app.model.is_some() {
            "Type a message and press Enter. Alt-Enter adds a line; Ctrl-P edits sampling; Ctrl-G sets a system prompt; ? shows every key."
        } else {
            "The model is loading; you can type already."
        };
        return wrap(&[(hint.to_string(), t.style(Role::Muted))], w, "");
    }
    let n = app.chat.messages.len();
    for (i, m) in app.chat.messages.iter().enumerate() {
        let (name, style) = match m.role {
            Speaker::User => ("You", t.style(Role::User)),
            Speaker::Assistant => ("BlackMamba", t.style(Role::Assistant).add_modifier(Modifier::BOLD)),
            Speaker::System => ("System", t.style(Role::System)),
        };
        out.push(Line::from(Span::styled(name, style)));
        let base = match m.role {
            Speaker::User => t.style(Role::Text),
            Speaker::Assistant => t.style(Role::Assistant),
            Speaker::System => t.style(Role::System),
        };
        let mut segs: Vec<(String, Style)> = m
            .segments
            .iter()
            .map(|(text, pos)| {
                let st = match (app.chat.color_experts, pos) {
                    (true, Some(p)) => app.tele.expert_at(*p, app.chat.color_layer).map_or(base, |e| t.expert_text(e)),
                    _ => base,
                };
                (sanitize(text), st)
            })
            .collect();
        // the answer starts with the space after "Assistant:"
        if let Some(first) = segs.iter_mut().find(|(s, _)| !s.is_empty()) {
            first.0 = first.0.trim_start().to_string();
        }
        let last = i + 1 == n;
        if last && m.role == Speaker::Assistant && app.busy.is_some() {
            let frame = SPINNER[(app.tick as usize) % SPINNER.len()];
            segs.push((format!(" {frame}"), t.style(Role::Accent)));
        }
        if segs.iter().all(|(s, _)| s.is_empty()) {
            segs.push((String::new(), base));
        }
        out.extend(wrap(&segs, w, "  "));
        if !last {
            out.push(Line::default());
        }
    }
    out
}

fn history(app: &App, area: Rect, buf: &mut Buffer) {
    if area.is_empty() {
        return;
    }
    let all = history_lines(app, usize::from(area.width));
    let h = usize::from(area.height);
    let max_scroll = all.len().saturating_sub(h);
    let s = app.chat.scroll.min(max_scroll);
    let end = all.len() - s;
    let start = end.saturating_sub(h);
    lines(area, buf, all[start..end].to_vec());
    if s > 0 {
        let label = format!(" ↑ {s} more below ");
        let x = area.right().saturating_sub(label.chars().count() as u16);
        put(buf, area, x, area.bottom() - 1, &label, app.theme.style(Role::Selection));
    }
}

fn editor(app: &App, ed: &Editor, focused: bool, area: Rect, buf: &mut Buffer) {
    if area.is_empty() {
        return;
    }
    let t = &app.theme;
    // Only the logical lines near the cursor are wrapped, so a huge paste costs nothing per frame.
    let h = usize::from(area.height);
    let cursor = ed.cursor.min(ed.text.len());
    let from = ed.text[..cursor].rmatch_indices('\n').nth(h).map_or(0, |(i, _)| i + 1);
    let to = ed.text[cursor..]
        .match_indices('\n')
        .nth(h)
        .map_or(ed.text.len(), |(i, _)| cursor + i);
    // and within a very long line, only the part around the cursor
    let span = 4 * usize::from(area.width) * h + 16;
    let mut from = from.max(cursor.saturating_sub(span));
    while !ed.text.is_char_boundary(from) {
        from += 1;
    }
    let mut to = to.min(cursor + span);
    while !ed.text.is_char_boundary(to) {
        to -= 1;
    }
    let (before, after) = (&ed.text[from..cursor], &ed.text[cursor..to.max(cursor)]);
    let mut chars = after.chars();
    let at = match chars.clone().next() {
        Some('\n') | None => " ".to_string(),
        Some(c) => {
            chars.next();
            c.to_string()
        }
    };
    let rest: String = if after.starts_with('\n') {
        after.to_string()
    } else {
        chars.collect()
    };
    let cursor = if focused { t.style(Role::Cursor) } else { t.style(Role::Input) };
    let segs = vec![
        (sanitize(before), t.style(Role::Input)),
        (sanitize(&at), cursor),
        (sanitize(&rest), t.style(Role::Input)),
    ];
    let all = wrap(&segs, usize::from(area.width), "");
    let cur_line = all
        .iter()
        .position(|l| l.spans.iter().any(|s| s.style == cursor && focused))
        .unwrap_or(0);
    let start = (cur_line + 1).saturating_sub(h);
    lines(area, buf, all.into_iter().skip(start).take(h).collect());
}

fn sampling(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let focused = app.chat.focus == ChatFocus::Sampling;
    let inner = framed(app, "Sampling", focused, area, buf);
    let mut ls = Vec::new();
    for (i, name) in SAMPLING_FIELDS.iter().enumerate() {
        let v = sampling_value(&app.chat.params, i);
        let sel = focused && i == app.chat.param_sel;
        let w = usize::from(inner.width).saturating_sub(name.len() + 1);
        let style = if sel { t.style(Role::Selection) } else { t.style(Role::Text) };
        ls.push(Line::from(vec![
            Span::styled(name.to_string(), if sel { style } else { t.style(Role::Muted) }),
            Span::styled(format!(" {v:>w$}"), style),
        ]));
    }
    ls.push(Line::default());
    let moe = app.model.as_ref().map(|m| m.moe_layers.clone()).unwrap_or_default();
    let colour = if app.chat.color_experts {
        match moe.get(app.chat.color_layer) {
            Some((l, _)) => format!("layer {l}"),
            None => "on".into(),
        }
    } else {
        "off".into()
    };
    ls.push(Line::from(vec![
        Span::styled("expert colours ", t.style(Role::Muted)),
        Span::styled(colour, t.style(Role::Text)),
    ]));
    if app.chat.color_experts {
        let n = moe.get(app.chat.color_layer).map_or(0, |&(_, e)| e);
        let mut spans = vec![];
        for e in 0..n {
            spans.push(Span::styled(format!("{e}"), t.expert_text(e).add_modifier(Modifier::BOLD)));
        }
        ls.push(Line::from(spans));
    }
    if !focused {
        ls.push(Line::from(Span::styled("Ctrl-P to edit", t.style(Role::Muted))));
    } else {
        ls.push(Line::from(Span::styled("←→ change, Esc done", t.style(Role::Muted))));
    }
    lines(inner, buf, ls);
}

/// Keys of the message input; other keys edit the message ([`crate::tui::editor::EDIT_KEYS`]).
pub const INPUT_KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Enter)], "send the message", |app, _, out| send(app, out)).legend("send"),
    bind(
        &[Chord::alt_key(KeyCode::Enter), Chord::shift_key(KeyCode::Enter), Chord::ctrl('j')],
        "new line in the message",
        |app, _, _| app.chat.input.insert("\n"),
    )
    .legend("newline"),
    bind(&[Chord::ctrl('p')], "sampling panel", |app, _, _| {
        app.chat.focus = ChatFocus::Sampling
    })
    .legend("sampling"),
    bind(
        &[Chord::ctrl('r')],
        "regenerate the last answer (from the saved state)",
        |app, _, out| regenerate(app, out),
    )
    .legend("regenerate"),
    bind(&[Chord::ctrl('z')], "undo the last turn (restores the state)", |app, _, out| {
        if app.ready() {
            out.push(Command::Undo);
        }
    })
    .legend("undo"),
    bind(&[Chord::ctrl('n')], "new chat (keeps the system prompt)", |app, _, out| {
        if app.ready() {
            out.push(Command::NewChat {
                system: app.chat.system.clone(),
            });
            app.stats = None;
        }
    })
    .legend("new"),
    bind(&[Chord::ctrl('g')], "system prompt: set it and start a new chat", |app, _, _| {
        app.chat.system_input = Editor::new(app.chat.system.as_deref().unwrap_or(""));
        app.chat.focus = ChatFocus::System;
    })
    .legend("system"),
    bind(
        &[Chord::ctrl('s')],
        "save the conversation (JSON with state snapshots)",
        |app, _, _| {
            app.chat.focus = ChatFocus::Path(true);
        },
    )
    .legend("save"),
    bind(&[Chord::ctrl('o')], "load a saved conversation", |app, _, _| {
        app.chat.focus = ChatFocus::Path(false)
    })
    .legend("load"),
    bind(&[Chord::ctrl('t')], "colour tokens by expert", |app, _, _| {
        app.chat.color_experts = !app.chat.color_experts
    })
    .legend("experts"),
    bind(&[Chord::ctrl('l')], "the MoE layer of the colours", |app, _, _| {
        app.chat.color_layer = step_in(app.chat.color_layer, 1, app.moe_count().max(1));
        app.chat.color_experts = true;
    }),
    bind(&[Chord::ctrl('u')], "clear the message", |app, _, _| app.chat.input.clear()),
    bind(&[Chord::key(KeyCode::PageUp)], "scroll the history up", |app, _, _| app.scroll(-10)),
    bind(&[Chord::key(KeyCode::PageDown)], "scroll the history down", |app, _, _| {
        app.scroll(10)
    }),
    bind(
        &[Chord::key(KeyCode::Up)],
        "line up in the message, else scroll the history",
        |app, _, _| {
            if !app.chat.input.up() {
                app.scroll(-1);
            }
        },
    ),
    bind(
        &[Chord::key(KeyCode::Down)],
        "line down in the message, else scroll the history",
        |app, _, _| {
            if !app.chat.input.down() {
                app.scroll(1);
            }
        },
    ),
];

/// Keys of the sampling panel (Ctrl-P).
pub const SAMPLING_KEYS: &[Binding<KeyAction>] = &[
    bind(
        &[Chord::key(KeyCode::Esc), Chord::key(KeyCode::Enter), Chord::ctrl('p')],
        "back to the message",
        |app, _, _| app.chat.focus = ChatFocus::Input,
    )
    .legend("back"),
    bind(&[Chord::key(KeyCode::Up), Chord::ch('k')], "previous parameter", |app, _, _| {
        app.chat.param_sel = step_in(app.chat.param_sel, -1, SAMPLING_FIELDS.len());
    })
    .legend("parameter"),
    bind(&[Chord::key(KeyCode::Down), Chord::ch('j')], "next parameter", |app, _, _| {
        app.chat.param_sel = step_in(app.chat.param_sel, 1, SAMPLING_FIELDS.len());
    }),
    bind(
        &[Chord::key(KeyCode::Left), Chord::ch('-'), Chord::ch('h')],
        "decrease",
        |app, _, _| {
            adjust(&mut app.chat.params, app.chat.param_sel, -1.0);
        },
    )
    .legend("change"),
    bind(
        &[Chord::key(KeyCode::Right), Chord::ch('+'), Chord::ch('='), Chord::ch('l')],
        "increase",
        |app, _, _| adjust(&mut app.chat.params, app.chat.param_sel, 1.0),
    ),
];

/// Keys of the save, load and system prompts; other keys edit the text.
pub const PROMPT_KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Enter)], "save, load, or start the new chat", |app, _, out| {
        submit(app, out)
    })
    .legend("ok"),
    bind(&[Chord::key(KeyCode::Esc)], "cancel", |app, _, _| app.chat.focus = ChatFocus::Input).legend("cancel"),
];

/// The help sections of the chat view.
pub fn help() -> Vec<Section> {
    vec![
        section("Chat", INPUT_KEYS, &[]),
        section("Chat: sampling panel (Ctrl-P)", SAMPLING_KEYS, &[]),
        section("Chat: save, load and system prompts (Ctrl-S, Ctrl-O, Ctrl-G)", PROMPT_KEYS, &[]),
    ]
}

/// The keys the legend line shows now.
pub fn legend(app: &App) -> &'static [Binding<KeyAction>] {
    match app.chat.focus {
        ChatFocus::Input => INPUT_KEYS,
        ChatFocus::Sampling => SAMPLING_KEYS,
        ChatFocus::Path(_) | ChatFocus::System => PROMPT_KEYS,
    }
}

/// A key in the chat view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(legend(app), &k) {
        (b.action)(app, k, out);
        return;
    }
    let _ = match app.chat.focus {
        ChatFocus::Input => edit(&mut app.chat.input, k),
        ChatFocus::Path(_) => edit(&mut app.chat.path, k),
        ChatFocus::System => edit(&mut app.chat.system_input, k),
        ChatFocus::Sampling => false,
    };
}

fn send(app: &mut App, out: &mut Vec<Command>) {
    if app.chat.input.is_blank() || !app.ready() {
        return;
    }
    let text = app.chat.input.take();
    let (id, cancel) = app.new_request();
    app.chat.scroll = 0;
    out.push(Command::Chat {
        id,
        text: text.trim().to_string(),
        params: app.chat.params.clone(),
        cancel,
    });
}

fn regenerate(app: &mut App, out: &mut Vec<Command>) {
    if !app.ready() {
        return;
    }
    if app.chat.messages.iter().all(|m| m.role != Speaker::Assistant) {
        app.notify("nothing to regenerate yet", false);
        return;
    }
    let (id, cancel) = app.new_request();
    out.push(Command::Regenerate {
        id,
        params: app.chat.params.clone(),
        cancel,
    });
}

/// Enter in a prompt: save or load the conversation, or start a chat with the system prompt.
fn submit(app: &mut App, out: &mut Vec<Command>) {
    let focus = app.chat.focus;
    app.chat.focus = ChatFocus::Input;
    match focus {
        ChatFocus::Path(save) => {
            let p = std::path::PathBuf::from(app.chat.path.text.trim());
            if p.as_os_str().is_empty() {
                app.notify("no file name given", true);
            } else if app.ready() {
                out.push(if save { Command::SaveChat(p) } else { Command::LoadChat(p) });
            }
        }
        ChatFocus::System => {
            if app.ready() {
                let text = app.chat.system_input.text.trim();
                app.chat.system = (!text.is_empty()).then(|| text.to_string());
                out.push(Command::NewChat {
                    system: app.chat.system.clone(),
                });
                app.stats = None;
            }
        }
        ChatFocus::Input | ChatFocus::Sampling => {}
    }
}

/// Changes sampling field `i` by one step in direction `d`.
pub fn adjust(p: &mut SamplingParams, i: usize, d: f64) {
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
