//! The state view: per Mamba layer, the norms of the SSM state h and of the conv state after every
//! token as line charts, a layers × positions heatmap of ‖h‖, and the mean step size Δ per layer.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};

use crossterm::event::{KeyCode, KeyEvent};

use crate::engine::protocol::Command;
use crate::tui::app::{bind, App, KeyAction};
use crate::tui::keymap::{find, section, step_in, Binding, Chord, Section};
use crate::tui::theme::Role;
use crate::tui::widgets::{bar, framed, line_chart, lines, put, short, Series};

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let inner = framed(app, "State", false, area, buf);
    if inner.is_empty() {
        return;
    }
    let mamba = app.model.as_ref().map(|m| m.mamba_layers.clone()).unwrap_or_default();
    let slot = app.state_layer.min(mamba.len().saturating_sub(1));
    let layer = mamba.get(slot).copied().unwrap_or(0);
    let [charts, bottom] = Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    let [c1, c2] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    let pts = |f: fn(&crate::engine::protocol::TokenRec) -> &Vec<f32>| -> Vec<(f64, f64)> {
        app.tele
            .tokens
            .iter()
            .filter_map(|t| f(t).get(slot).map(|&v| (t.pos as f64, f64::from(v))))
            .filter(|(_, v)| v.is_finite())
            .collect()
    };
    line_chart(
        app,
        &format!("SSM state ‖h‖, layer {layer}"),
        "position",
        &[Series {
            name: "‖h‖",
            points: pts(|t| &t.ssm_norm),
            color: 0,
        }],
        false,
        c1,
        buf,
    );
    line_chart(
        app,
        &format!("Conv state norm, layer {layer}"),
        "position",
        &[Series {
            name: "‖conv‖",
            points: pts(|t| &t.conv_norm),
            color: 1,
        }],
        false,
        c2,
        buf,
    );
    let wide = bottom.width >= 60;
    let [heat, delta] = if wide {
        Layout::horizontal([Constraint::Min(30), Constraint::Length(34)]).areas(bottom)
    } else {
        [bottom, Rect::default()]
    };
    heatmap(app, &mamba, slot, heat, buf);
    if wide {
        mean_delta(app, &mamba, slot, delta, buf);
    }
}

fn heatmap(app: &App, mamba: &[usize], sel: usize, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "‖h‖: layers × positions (row-scaled)", false, area, buf);
    if inner.is_empty() {
        return;
    }
    let label_w = 5u16;
    let cols = usize::from(inner.width.saturating_sub(label_w));
    let toks: Vec<_> = app.tele.tokens.iter().filter(|t| !t.ssm_norm.is_empty()).collect();
    if toks.is_empty() {
        put(
            buf,
            inner,
            inner.x,
            inner.y,
            "no state telemetry yet: chat first",
            t.style(Role::Muted),
        );
        return;
    }
    let shown = &toks[toks.len().saturating_sub(cols)..];
    let rows = usize::from(inner.height.saturating_sub(1));
    let first_row = sel.saturating_sub(rows.saturating_sub(1));
    for (r, (slot, &layer)) in mamba.iter().enumerate().skip(first_row).take(rows).enumerate() {
        let y = inner.y + r as u16;
        let style = if slot == sel {
            t.style(Role::Selection)
        } else {
            t.style(Role::Muted)
        };
        put(buf, inner, inner.x, y, &format!("L{layer:<3}"), style);
        let vals: Vec<f32> = shown.iter().map(|t| t.ssm_norm.get(slot).copied().unwrap_or(f32::NAN)).collect();
        let (lo, hi) = vals
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        for (c, &v) in vals.iter().enumerate() {
            let x = inner.x + label_w + c as u16;
            let norm = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            let color = t.ramp(if v.is_finite() { norm } else { f32::NAN });
            put(buf, inner, x, y, " ", Style::new().bg(color));
        }
    }
    let y = inner.bottom() - 1;
    if inner.height >= 2 {
        let first = shown.first().map_or(0, |t| t.pos);
        let last = shown.last().map_or(0, |t| t.pos);
        put(
            buf,
            inner,
            inner.x + label_w,
            y,
            &format!("positions {first} … {last}   low "),
            t.style(Role::Muted),
        );
        let x = inner.x + label_w + format!("positions {first} … {last}   low ").chars().count() as u16;
        for k in 0..8u16 {
            put(buf, inner, x + k, y, " ", Style::new().bg(t.ramp(f32::from(k) / 7.0)));
        }
        put(buf, inner, x + 8, y, " high", t.style(Role::Muted));
    }
}

fn mean_delta(app: &App, mamba: &[usize], sel: usize, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "Mean Δ per layer", false, area, buf);
    let mut avg = vec![0f64; mamba.len()];
    let mut n = vec![0usize; mamba.len()];
    let mut last = vec![f32::NAN; mamba.len()];
    for tok in &app.tele.tokens {
        for (k, &d) in tok.mean_delta.iter().enumerate().take(mamba.len()) {
            if d.is_finite() {
                avg[k] += f64::from(d);
                n[k] += 1;
                last[k] = d;
            }
        }
    }
    for (a, &c) in avg.iter_mut().zip(&n) {
        *a /= c.max(1) as f64;
    }
    let max = avg.iter().copied().fold(0f64, f64::max);
    let mut ls = vec![Line::from(Span::styled("layer  mean   last  ", t.style(Role::Muted)))];
    let bw = usize::from(inner.width).saturating_sub(20);
    let rows = usize::from(inner.height.saturating_sub(1));
    let first = sel.saturating_sub(rows.saturating_sub(1));
    for (k, &layer) in mamba.iter().enumerate().skip(first) {
        let style = if k == sel { t.style(Role::Selection) } else { t.style(Role::Text) };
        let v = if n[k] > 0 { short(avg[k]) } else { "–".into() };
        ls.push(Line::from(vec![
            Span::styled(format!("L{layer:<4}{v:>6} {:>6} ", short(f64::from(last[k]))), style),
            Span::styled(bar(avg[k], max, bw), Style::new().fg(t.series(2))),
        ]));
    }
    lines(inner, buf, ls);
}

/// Keys of the state view.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(
        &[Chord::key(KeyCode::Left), Chord::ch('h'), Chord::key(KeyCode::Up)],
        "previous Mamba layer of the line charts",
        |app, _, _| app.state_layer = step_in(app.state_layer, -1, app.mamba_count()),
    )
    .legend("layer"),
    bind(
        &[Chord::key(KeyCode::Right), Chord::ch('l'), Chord::key(KeyCode::Down)],
        "next Mamba layer",
        |app, _, _| app.state_layer = step_in(app.state_layer, 1, app.mamba_count()),
    ),
];

/// The help section of this view.
pub fn help() -> Section {
    section("State: Mamba state norms over positions", KEYS, &[])
}

/// A key in this view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(KEYS, &k) {
        (b.action)(app, k, out);
    }
}
