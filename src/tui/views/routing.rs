//! The routing view: a tokens × MoE-layers grid coloured by the chosen expert (id printed in each
//! cell, colour-blind-safe palette, legend), the selected token's expert and gate probability per
//! layer, and per-layer load balance over the conversation. For a top-k model (OLMoE, Mixtral) the
//! grid shows each token's first expert, the detail all k with their router probabilities, the
//! loads count every choice, and with more than ten experts the legend gives the id range and the
//! load sparkline one column per group of experts. `c` ("compare with bf16") runs the chat's text
//! through the model in another weight format and adds each layer's routing flips to the table.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};

use crossterm::event::{KeyCode, KeyEvent};

use crate::engine::protocol::Command;
use crate::tui::app::{bind, App, KeyAction};
use crate::tui::keymap::{find, section, Binding, Chord, Section};
use crate::tui::store::balance;
use crate::tui::text::{fit, one_line};
use crate::tui::theme::Role;
use crate::tui::widgets::{bar, framed, lines, put};

const LABEL_W: usize = 12;

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let moe = app.model.as_ref().map(|m| m.moe_layers.clone()).unwrap_or_default();
    let cw: usize = if moe.len() * 3 + LABEL_W + 2 <= usize::from(area.width) / 2 || area.width < 60 {
        3
    } else {
        2
    };
    let grid_w = (LABEL_W + 1 + moe.len() * cw + 2) as u16;
    let side = area.width >= 60 && area.width > grid_w + 24;
    let [left, right] = if side {
        Layout::horizontal([Constraint::Length(grid_w.max(28)), Constraint::Min(24)]).areas(area)
    } else {
        [area, Rect::default()]
    };
    let inner = framed(app, "Routing", false, left, buf);
    grid(app, &moe, cw, inner, buf);
    if side {
        let [top, bottom] = Layout::vertical([Constraint::Percentage(45), Constraint::Min(3)]).areas(right);
        token_detail(app, &moe, top, buf);
        balance_table(app, &moe, bottom, buf);
    }
}

/// Index of the selected token and the first shown row for `h` rows.
fn window(app: &App, h: usize) -> (Option<usize>, usize) {
    let n = app.tele.len();
    if n == 0 {
        return (None, 0);
    }
    let sel = app.routing_sel.unwrap_or(n - 1).min(n - 1);
    let start = if app.routing_sel.is_none() {
        n.saturating_sub(h)
    } else {
        sel.saturating_sub(h / 2).min(n.saturating_sub(h))
    };
    (Some(sel), start)
}

fn grid(app: &App, moe: &[(usize, usize)], cw: usize, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    if area.is_empty() {
        return;
    }
    if app.tele.is_empty() {
        put(buf, area, area.x, area.y, "no tokens yet: chat first", t.style(Role::Muted));
        return;
    }
    // header: layer indices
    let mut x = area.x + LABEL_W as u16 + 1;
    put(buf, area, area.x, area.y, &fit("token", LABEL_W), t.style(Role::Muted));
    for &(l, _) in moe {
        put(buf, area, x, area.y, &fit(&format!("L{l}"), cw), t.style(Role::Muted));
        x += cw as u16;
    }
    let legend_h = u16::from(area.height >= 4);
    let rows = usize::from(area.height.saturating_sub(1 + legend_h));
    let (sel, start) = window(app, rows);
    for (r, tok) in app.tele.tokens.iter().skip(start).take(rows).enumerate() {
        let y = area.y + 1 + r as u16;
        let selected = sel == Some(start + r);
        let label_style = if selected {
            t.style(Role::Selection)
        } else if tok.generated {
            t.style(Role::Text)
        } else {
            t.style(Role::Muted)
        };
        put(buf, area, area.x, y, &fit(&one_line(&tok.piece), LABEL_W), label_style);
        let mut x = area.x + LABEL_W as u16 + 1;
        for slot in 0..moe.len() {
            match tok.routes.get(slot).filter(|r| r.prob.is_finite()) {
                Some(r) => {
                    let e = usize::from(r.expert);
                    put(buf, area, x, y, &fit(&format!("{e:^cw$}"), cw), t.expert_cell(e));
                }
                None => put(buf, area, x, y, &fit(" ·", cw), t.style(Role::Muted)),
            }
            x += cw as u16;
        }
    }
    if legend_h > 0 {
        let y = area.bottom() - 1;
        let n = moe.iter().map(|&(_, e)| e).max().unwrap_or(0);
        let k = 1 + app
            .tele
            .tokens
            .iter()
            .map(|t| t.more.first().map_or(0, Vec::len))
            .max()
            .unwrap_or(0);
        let mut x = area.x;
        if n <= 10 {
            put(buf, area, x, y, "experts ", t.style(Role::Muted));
            x += 8;
            for e in 0..n {
                put(buf, area, x, y, &format!("{e}"), t.expert_cell(e));
                x += 1;
            }
        } else {
            // ids of two digits: the cells print them; the palette cycles
            let text = format!("experts 0–{}", n - 1);
            put(buf, area, x, y, &text, t.style(Role::Muted));
            x += text.chars().count() as u16;
        }
        let info = if k > 1 {
            format!(" {} tok top-{k}", app.tele.len())
        } else {
            format!(" {} tokens", app.tele.len())
        };
        put(buf, area, x, y, &info, t.style(Role::Muted));
    }
}

fn token_detail(app: &App, moe: &[(usize, usize)], area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "Selected token", false, area, buf);
    let (sel, _) = window(app, 1);
    let Some(tok) = sel.and_then(|i| app.tele.tokens.get(i)) else {
        lines(
            inner,
            buf,
            vec![Line::from(Span::styled("↑↓ select a token", t.style(Role::Muted)))],
        );
        return;
    };
    let mut ls = vec![Line::from(vec![
        Span::styled(format!("'{}'", one_line(&tok.piece)), t.style(Role::Accent)),
        Span::styled(
            format!(
                "  pos {}  id {}  {}",
                tok.pos,
                tok.id,
                if tok.generated { "generated" } else { "prompt" }
            ),
            t.style(Role::Muted),
        ),
    ])];
    if tok.routes.is_empty() {
        ls.push(Line::from(Span::styled(
            "no telemetry (sampled last, not fed)",
            t.style(Role::Muted),
        )));
    }
    let bw = usize::from(inner.width).saturating_sub(18).min(20);
    for (slot, &(l, _)) in moe.iter().enumerate() {
        let Some(r) = tok.routes.get(slot).filter(|r| r.prob.is_finite()) else {
            continue;
        };
        let e = usize::from(r.expert);
        let more = tok.more.get(slot).filter(|m| !m.is_empty());
        let p = if more.is_some() { "p" } else { "σ" };
        let bw = if more.is_some() { bw.min(8) } else { bw };
        let mut spans = vec![
            Span::styled(format!("L{l:<3}"), t.style(Role::Muted)),
            Span::styled(format!(" {e} "), t.expert_cell(e)),
            Span::styled(format!(" {p} {:.2} ", r.prob), t.style(Role::Text)),
            Span::styled(bar(f64::from(r.prob), 1.0, bw), t.expert_text(e)),
        ];
        // a top-k model: the other chosen experts, best first
        for &(x, q) in more.map_or(&[][..], Vec::as_slice) {
            spans.push(Span::raw(" "));
            spans.push(Span::styled(format!("{x}"), t.expert_text(usize::from(x))));
            spans.push(Span::styled(format!(" {q:.2}"), t.style(Role::Muted)));
        }
        ls.push(Line::from(spans));
    }
    lines(inner, buf, ls);
}

fn balance_table(app: &App, moe: &[(usize, usize)], area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    // the `c` toggle: flips of the chat's text under another weight format, per layer
    let flips = app.cmp.format_report().filter(|_| app.cmp.in_routing);
    let title = match (flips, app.cmp.in_routing) {
        (Some(r), _) => format!("Balance; flips {} vs {}", r.b.format, r.a.format),
        (None, true) if app.cmp.pending.is_some() => "Balance; comparing formats…".to_string(),
        _ => "Balance over the conversation".to_string(),
    };
    let inner = framed(app, &title, false, area, buf);
    const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let mut ls = vec![Line::from(Span::styled(
        if flips.is_some() {
            "layer loads      CV   entropy busiest sticky  flips"
        } else {
            "layer loads      CV   entropy busiest sticky"
        },
        t.style(Role::Muted),
    ))];
    for (slot, &(l, e)) in moe.iter().enumerate() {
        let b = balance(&app.tele, slot, e);
        // at most 10 columns: with more experts each column is the busiest of a group
        let group = b.loads.len().div_ceil(10).max(1);
        let cols: Vec<(usize, usize)> = b
            .loads
            .chunks(group)
            .enumerate()
            .map(|(c, g)| (c * group, g.iter().copied().max().unwrap_or(0)))
            .collect();
        let max = cols.iter().map(|c| c.1).max().unwrap_or(0).max(1);
        let mut spans = vec![Span::styled(format!("L{l:<4}"), t.style(Role::Muted))];
        for &(k, n) in &cols {
            let level = if n == 0 { ' ' } else { LEVELS[((n * 7) / max).min(7)] };
            spans.push(Span::styled(level.to_string(), t.expert_text(k)));
        }
        let pad = 10usize.saturating_sub(cols.len());
        spans.push(Span::raw(" ".repeat(pad)));
        if b.tokens == 0 {
            spans.push(Span::styled("–", t.style(Role::Muted)));
        } else {
            spans.push(Span::styled(
                format!(
                    "{:>5.2} {:>6.2} {:>6.0}% {:>5.0}%",
                    b.cv,
                    b.entropy,
                    b.busiest * 100.0,
                    b.stickiness * 100.0
                ),
                t.style(Role::Text),
            ));
        }
        if let Some(f) = flips.and_then(|r| r.layers.iter().find(|f| f.slot_a == slot)) {
            spans.push(Span::styled(format!(" {:>5.1}%", f.flip_share() * 100.0), t.style(Role::Accent)));
        }
        ls.push(Line::from(spans));
    }
    lines(inner, buf, ls);
}

/// Keys of the routing view.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Up), Chord::ch('k')], "previous token", |app, _, _| {
        app.move_token(-1)
    })
    .legend("token"),
    bind(&[Chord::key(KeyCode::Down), Chord::ch('j')], "next token", |app, _, _| {
        app.move_token(1)
    }),
    bind(&[Chord::key(KeyCode::PageUp)], "20 tokens back", |app, _, _| app.move_token(-20)).legend("page"),
    bind(&[Chord::key(KeyCode::PageDown)], "20 tokens on", |app, _, _| app.move_token(20)),
    bind(&[Chord::key(KeyCode::Home), Chord::ch('g')], "first token", |app, _, _| {
        app.move_token(-(app.tele.len() as isize));
    })
    .legend("first/newest"),
    bind(
        &[Chord::key(KeyCode::End), Chord::ch('G')],
        "newest token (follows the generation)",
        |app, _, _| {
            app.routing_sel = None;
        },
    ),
    bind(
        &[Chord::ch('c')],
        "compare with bf16: flips per layer of the chat's text under another weight format (toggle)",
        |app, _, out| {
            app.cmp.in_routing = !app.cmp.in_routing;
            // each time on: the chat's text as it is now
            if app.cmp.in_routing {
                let (with, what) = crate::tui::compare_state::format_target(app);
                crate::tui::compare_state::request(app, with, what, out);
                if app.cmp.pending.is_none() {
                    app.cmp.in_routing = false;
                }
            }
        },
    )
    .legend("compare"),
];

/// The help section of this view.
pub fn help() -> Section {
    section(
        "Routing: which expert each token went to, per MoE layer",
        KEYS,
        &[("", "cells: expert id on its colour; loads, CV, entropy, busiest share, stickiness")],
    )
}

/// A key in this view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(KEYS, &k) {
        (b.action)(app, k, out);
    }
}
