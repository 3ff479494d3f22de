//! The chat view: the conversation (streaming, scrollable, optionally coloured by expert), the
//! message input and the sampling panel.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use crate::chat_template::Role as Speaker;
use crate::tui::app::{sampling_value, App, ChatFocus, SAMPLING_FIELDS};
use crate::tui::text::{sanitize, wrap};
use crate::tui::theme::Role;
use crate::tui::widgets::{framed, lines, put};

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
    let focused_input = matches!(app.chat.focus, ChatFocus::Input | ChatFocus::Path(_));
    // below 5 rows the frame would leave no room for the text
    let inner = if hist.height >= 5 {
        framed(app, "Chat", false, hist, buf)
    } else {
        hist
    };
    history(app, inner, buf);
    let ed = match app.chat.focus {
        ChatFocus::Path(_) => &app.chat.path,
        _ => &app.chat.input,
    };
    if input.height >= 3 {
        let title = match app.chat.focus {
            ChatFocus::Path(true) => "Save conversation to (Enter saves, Esc cancels)",
            ChatFocus::Path(false) => "Load conversation from (Enter loads, Esc cancels)",
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
            "Type a message and press Enter. Alt-Enter adds a line; Ctrl-P edits sampling; ? shows every key."
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

fn editor(app: &App, ed: &crate::tui::text::Editor, focused: bool, area: Rect, buf: &mut Buffer) {
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
