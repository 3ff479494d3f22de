//! The frame: tab bar, banner, the current view, status bar and key legend, plus the help, loading
//! and fatal overlays. Degrades down to tiny sizes and never panics.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Widget};

use crate::engine::HBM_BANDWIDTH_CEILING;
use crate::tui::app::{App, View, TICKS_PER_SEC};
use crate::tui::keymap::{self, section, Section};
use crate::tui::text::{clip, sanitize, width};
use crate::tui::theme::Role;
use crate::tui::update;
use crate::tui::views;
use crate::tui::widgets::{framed, lines, put};

/// Draws the whole screen into `buf` (its area is the terminal).
pub fn draw(app: &App, area: Rect, buf: &mut Buffer) {
    buf.set_style(area, app.theme.background());
    if area.width < 20 || area.height < 6 {
        tiny(app, area, buf);
        return;
    }
    let banner = app.model.as_ref().is_some_and(|m| m.untrained);
    let [tabs_a, banner_a, body, status_a, legend_a] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::from(banner && area.height >= 10)),
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(u16::from(area.height >= 8)),
    ])
    .areas(area);
    tabs(app, tabs_a, buf);
    if banner_a.height > 0 {
        let text = " untrained demo weights: the model's text is noise. Run with --model DIR|HUB-ID or press Ctrl-K ";
        buf.set_style(banner_a, app.theme.style(Role::Banner));
        put(buf, banner_a, banner_a.x, banner_a.y, text, app.theme.style(Role::Banner));
    }
    if let Some(f) = &app.fatal {
        let inner = framed(app, "Engine stopped", true, body, buf);
        lines(
            inner,
            buf,
            vec![
                Line::from(Span::styled(sanitize(f), app.theme.style(Role::Error))),
                Line::default(),
                Line::from(Span::styled("Ctrl-Q quits.", app.theme.style(Role::Muted))),
            ],
        );
    } else {
        match app.view {
            View::Chat => views::chat::render(app, body, buf),
            View::Routing => views::routing::render(app, body, buf),
            View::Sinkhorn => views::sinkhorn::render(app, body, buf),
            View::State => views::state::render(app, body, buf),
            View::Finetune => views::finetune::render(app, body, buf),
            View::Compare => views::compare::render(app, body, buf),
        }
        if app.model.is_none() || app.switching.is_some() {
            loading(app, body, buf);
        } else if app.picker.open {
            views::picker::render(app, body, buf);
        }
    }
    status(app, status_a, buf);
    if legend_a.height > 0 {
        legend(app, legend_a, buf);
    }
    if app.help {
        help(app, body, buf);
    }
}

/// Below 20×6: the view's name and the one key that matters.
fn tiny(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let spin = if app.busy.is_some() { " …" } else { "" };
    put(
        buf,
        area,
        area.x,
        area.y,
        &format!("{}{spin}", app.view.title()),
        t.style(Role::Title),
    );
    if area.height >= 2 {
        put(
            buf,
            area,
            area.x,
            area.y + 1,
            "Ctrl-Q quits; enlarge the window",
            t.style(Role::Muted),
        );
    }
    if area.height >= 3 {
        if let Some(m) = app.chat.messages.last() {
            let text = crate::tui::text::one_line(&m.text());
            let w = usize::from(area.width);
            let tail: String = {
                let chars: Vec<char> = text.chars().collect();
                let n = chars.len();
                chars[n.saturating_sub(w * usize::from(area.height - 2))..].iter().collect()
            };
            lines(
                Rect::new(area.x, area.y + 2, area.width, area.height - 2),
                buf,
                crate::tui::text::wrap(&[(tail, t.style(Role::Text))], w, ""),
            );
        }
    }
}

fn tabs(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let mut spans = vec![Span::styled(" blackmamba ", t.style(Role::Accent))];
    for (i, v) in View::ALL.iter().enumerate() {
        let style = if *v == app.view {
            t.style(Role::TabActive)
        } else {
            t.style(Role::TabInactive)
        };
        spans.push(Span::styled(format!(" F{} {} ", i + 1, v.title()), style));
    }
    let mut used: usize = spans.iter().map(|s| width(&s.content)).sum();
    let label = app.model.as_ref().map(|m| format!(" {} ", sanitize(&m.label)));
    let label_w = label.as_ref().map_or(0, |l| width(l) + 2);
    // a narrow terminal keeps every tab and the model's label, dropping the program's name
    if used + label_w > usize::from(area.width) {
        used -= width(&spans.remove(0).content);
    }
    if let Some(label) = label {
        let room = usize::from(area.width).saturating_sub(used);
        if room > width(&label) + 1 {
            spans.push(Span::raw(" ".repeat(room - width(&label))));
            spans.push(Span::styled(label, t.style(Role::Muted)));
        }
    }
    lines(area, buf, vec![Line::from(spans)]);
}

fn loading(app: &App, body: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let w = body.width.min(60);
    let h = 5.min(body.height);
    let area = Rect::new(body.x + (body.width - w) / 2, body.y + (body.height - h) / 2, w, h);
    Clear.render(area, buf);
    let inner = framed(app, "Loading the model", true, area, buf);
    let (stage, done, total) = app
        .loading
        .as_ref()
        .map_or(("starting the engine".to_string(), 0, 1), |l| (l.stage.clone(), l.done, l.total));
    // downloads count bytes
    let amount = (stage.contains("download") && total > 1).then(|| {
        format!(
            "{} of {}",
            crate::catalog::human_bytes(done as f64),
            crate::catalog::human_bytes(total as f64)
        )
    });
    let spin = views::chat::SPINNER[(app.tick as usize) % 4];
    let secs = app.tick / TICKS_PER_SEC;
    let bw = usize::from(inner.width).saturating_sub(2);
    let filled = (bw.saturating_mul(done) / total.max(1)).min(bw);
    lines(
        inner,
        buf,
        vec![
            Line::from(Span::styled(format!("{spin} {} ({secs} s)", sanitize(&stage)), t.style(Role::Text))),
            Line::from(Span::styled(
                format!("{}{}", "█".repeat(filled), "░".repeat(bw - filled)),
                t.style(Role::Accent),
            )),
            Line::from(Span::styled(amount.unwrap_or_default(), t.style(Role::Muted))),
        ],
    );
}

/// The status line: the last generation's numbers, the device and dtype, or a notice.
pub fn status_text(app: &App) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(b) = &app.busy {
        let secs = app.tick.saturating_sub(b.started_tick) as f64 / TICKS_PER_SEC as f64;
        parts.push(format!("generating {secs:.1} s, Esc stops"));
    }
    if let Some((s, _)) = &app.stats {
        parts.push(format!("prompt {} tok", s.prompt_tokens));
        parts.push(format!("TTFT {:.0} ms", s.ttft_secs * 1e3));
        parts.push(format!("decode {:.1} tok/s", s.decode_tok_s()));
    }
    if let Some(m) = &app.model {
        match &m.quant {
            Some(q) => parts.push(format!("{} {} {q} weights", m.device, m.dtype)),
            None => parts.push(format!("{} {}", m.device, m.dtype)),
        }
        if m.is_gpu {
            if let Some((s, _)) = &app.stats {
                let bps = s.decode_tok_s() * m.bytes_per_token;
                parts.push(format!(
                    "{:.0} GB/s = {:.1}% of {:.1} TB/s",
                    bps / 1e9,
                    100.0 * bps / HBM_BANDWIDTH_CEILING,
                    HBM_BANDWIDTH_CEILING / 1e12
                ));
            }
        }
    }
    parts.join(" │ ")
}

fn status(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    buf.set_style(area, t.style(Role::Status));
    let notice = app.notice.as_ref().map(|n| (n.error, sanitize(&n.text).replace('\n', " ")));
    match notice {
        // errors take the whole line
        Some((true, text)) => {
            let style = t.style(Role::Error).bg(t.style(Role::Status).bg.unwrap_or_default());
            put(buf, area, area.x, area.y, &format!(" {text}"), style);
        }
        Some((false, text)) => {
            let status = format!(" {} │ ", status_text(app));
            put(buf, area, area.x, area.y, &status, t.style(Role::Status));
            let x = area.x.saturating_add(width(&status).min(usize::from(u16::MAX)) as u16);
            put(
                buf,
                area,
                x,
                area.y,
                &text,
                t.style(Role::Status).add_modifier(ratatui::style::Modifier::BOLD),
            );
        }
        None => put(buf, area, area.x, area.y, &format!(" {}", status_text(app)), t.style(Role::Status)),
    }
}

/// The legend line's (key, word) pairs: the keys that work now, from the tables that handle them.
pub fn legend_keys(app: &App) -> Vec<(String, &'static str)> {
    if app.picker.open && app.switching.is_none() {
        return keymap::legend(views::picker::KEYS);
    }
    let mut keys = match app.view {
        View::Chat => keymap::legend(views::chat::legend(app)),
        View::Routing => keymap::legend(views::routing::KEYS),
        View::Sinkhorn => keymap::legend(views::sinkhorn::KEYS),
        View::State => keymap::legend(views::state::KEYS),
        View::Finetune => keymap::legend(views::finetune::legend(app)),
        View::Compare => keymap::legend(views::compare::KEYS),
    };
    keys.extend(keymap::legend(update::GLOBAL_KEYS));
    keys
}

/// The help screen, from the same tables that handle the keys.
pub fn help_sections() -> Vec<Section> {
    let mut out = vec![update::everywhere()];
    out.extend(views::chat::help());
    out.push(section(
        "Text input (message, prompts, fields)",
        crate::tui::editor::EDIT_KEYS,
        &[("typing, paste", "insert text (a paste goes in whole)")],
    ));
    out.push(views::routing::help());
    out.push(views::sinkhorn::help());
    out.push(views::state::help());
    out.push(views::finetune::help());
    out.push(views::compare::help());
    out.push(views::picker::help());
    out.push(update::help_section());
    out
}

fn legend(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let mut spans = Vec::new();
    let mut used = 0;
    for (k, what) in legend_keys(app) {
        let w = width(&k) + width(what) + 3;
        if used + w > usize::from(area.width) {
            break;
        }
        used += w;
        spans.push(Span::styled(format!(" {k}"), t.style(Role::Key)));
        spans.push(Span::styled(format!(" {what} "), t.style(Role::Muted)));
    }
    lines(area, buf, vec![Line::from(spans)]);
}

fn help(app: &App, body: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let w = body.width.saturating_sub(4).min(90).max(body.width.min(20));
    let h = body.height;
    let area = Rect::new(body.x + (body.width - w) / 2, body.y, w, h);
    Clear.render(area, buf);
    let inner = framed(app, "Help: ↑↓ PgUp PgDn scroll, any other key closes", true, area, buf);
    let kw = 30.min(usize::from(inner.width) / 3);
    let mut ls = Vec::new();
    for s in help_sections() {
        if !s.title.is_empty() {
            ls.push(Line::from(Span::styled(s.title, t.style(Role::Accent))));
        }
        for (k, d) in s.lines {
            // keys too long for the column get a line of their own
            let keys = if width(&k) < kw {
                format!("  {k:<kw$}")
            } else {
                ls.push(Line::from(Span::styled(
                    format!("  {}", clip(&k, usize::from(inner.width))),
                    t.style(Role::Key),
                )));
                format!("  {:<kw$}", "")
            };
            ls.push(Line::from(vec![
                Span::styled(keys, t.style(Role::Key)),
                Span::styled(d, t.style(Role::Text)),
            ]));
        }
    }
    let h = usize::from(inner.height);
    let skip = app.help_scroll.min(ls.len().saturating_sub(h));
    let more = ls.len() > skip + h;
    lines(inner, buf, ls.into_iter().skip(skip).collect());
    if more && inner.height > 0 {
        let label = " ↓ more ";
        put(
            buf,
            inner,
            inner.right().saturating_sub(8),
            inner.bottom() - 1,
            label,
            t.style(Role::Selection),
        );
    }
}
