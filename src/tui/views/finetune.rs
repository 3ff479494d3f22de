//! The fine-tune panel: the form (dataset, method, LoRA targets/rank/alpha, learning rate, steps,
//! sequence length, batch, output), start/pause/stop/save, a progress bar with tokens/s and ETA,
//! the loss and eval-loss chart, and the routing of a fixed probe prompt before vs after. A DPO
//! run also shows its rewards (chosen, rejected), margin and accuracy, in numbers and on the chart.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Gauge, Widget};

use crossterm::event::{KeyCode, KeyEvent};

use crate::engine::protocol::{Command, FinetuneCommand, FinetuneStatus, PrefProgress, ProbeRouting};
use crate::tui::app::{bind, App, KeyAction};
use crate::tui::editor::{edit, Editor};
use crate::tui::finetune_state::{FinetuneState, FIELDS};
use crate::tui::keymap::{find, section, Binding, Chord, Section};
use crate::tui::text::{fit, one_line, sanitize};
use crate::tui::theme::Role;
use crate::tui::widgets::{framed, line_chart, lines, put, short, Series};

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let ft = &app.ft;
    let outer = framed(app, "Fine-tune", false, area, buf);
    if outer.is_empty() {
        return;
    }
    let available = app.model.as_ref().is_none_or(|m| m.finetune_available);
    let note = ft
        .message
        .clone()
        .or_else(|| (!available).then(|| "fine-tuning is not available in this build".to_string()));
    let [head, body] = Layout::vertical([Constraint::Length(u16::from(note.is_some())), Constraint::Min(0)]).areas(outer);
    if let Some(n) = note {
        put(buf, head, head.x, head.y, &sanitize(&n), t.style(Role::Warning));
    }
    let wide = body.width >= 70;
    let [form_a, right] = if wide {
        Layout::horizontal([Constraint::Length(36), Constraint::Min(30)]).areas(body)
    } else {
        Layout::vertical([Constraint::Length(FIELDS.len() as u16 + 4), Constraint::Min(0)]).areas(body)
    };
    form(app, ft, form_a, buf);
    let dpo = ft.history.last().is_some_and(|p| p.pref.is_some());
    let prog_rows = 6 + u16::from(dpo) + u16::from(ft.routing_shift.is_some());
    let [prog, chart, probe] = Layout::vertical([Constraint::Length(prog_rows), Constraint::Min(5), Constraint::Length(8)]).areas(right);
    progress(app, ft, prog, buf);
    let loss: Vec<(f64, f64)> = ft.history.iter().map(|p| (p.step as f64, p.loss)).collect();
    let eval: Vec<(f64, f64)> = ft.history.iter().filter_map(|p| p.eval_loss.map(|e| (p.step as f64, e))).collect();
    let mut series = vec![
        Series {
            name: "train",
            points: loss,
            color: 0,
        },
        Series {
            name: "eval",
            points: eval,
            color: 1,
        },
    ];
    if dpo {
        let of = |f: fn(&PrefProgress) -> f64| {
            ft.history
                .iter()
                .filter_map(|p| p.pref.as_ref().map(|r| (p.step as f64, f(r))))
                .collect()
        };
        series.push(Series {
            name: "margin",
            points: of(|r| r.margin),
            color: 2,
        });
        series.push(Series {
            name: "acc",
            points: of(|r| r.accuracy),
            color: 3,
        });
    }
    let title = if dpo { "Loss · DPO (eval: chosen responses)" } else { "Loss" };
    line_chart(app, title, "step", &series, false, chart, buf);
    probe_routing(app, ft, probe, buf);
}

fn form(app: &App, ft: &FinetuneState, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "Run", true, area, buf);
    let w = usize::from(inner.width).saturating_sub(16);
    let mut ls = Vec::new();
    for (i, name) in FIELDS.iter().enumerate() {
        let sel = i == ft.sel;
        let value = match (&ft.editing, sel) {
            (Some(ed), true) => format!("{}▏", ed.text),
            _ => ft.value(i),
        };
        let style = if sel { t.style(Role::Selection) } else { t.style(Role::Text) };
        let hint = if !sel {
            "  "
        } else if FinetuneState::is_text(i) {
            "⏎ "
        } else {
            "⇆ "
        };
        ls.push(Line::from(vec![
            Span::styled(format!("{name:<13}"), t.style(Role::Muted)),
            Span::styled(hint, t.style(Role::Key)),
            Span::styled(fit(&one_line(&value), w), style),
        ]));
    }
    ls.push(Line::default());
    ls.push(Line::from(vec![
        Span::styled("s", t.style(Role::Key)),
        Span::raw(" start  "),
        Span::styled("p", t.style(Role::Key)),
        Span::raw(" pause  "),
        Span::styled("x", t.style(Role::Key)),
        Span::raw(" stop  "),
        Span::styled("w", t.style(Role::Key)),
        Span::raw(" save"),
    ]));
    let using = if ft.using_finetuned { "fine-tuned" } else { "base" };
    ls.push(Line::from(vec![
        Span::styled("u", t.style(Role::Key)),
        Span::raw(" chat with: "),
        Span::styled(using, t.style(Role::Accent)),
    ]));
    lines(inner, buf, ls);
}

fn progress(app: &App, ft: &FinetuneState, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "Progress", false, area, buf);
    if inner.is_empty() {
        return;
    }
    let status = match ft.status {
        FinetuneStatus::Idle => "idle",
        FinetuneStatus::Running => "running",
        FinetuneStatus::Paused => "paused",
        FinetuneStatus::Stopped => "stopped",
        FinetuneStatus::Finished => "finished",
    };
    let last = ft.history.last();
    let (step, total) = last.map_or((0, ft.spec.steps), |p| (p.step, p.total_steps));
    let ratio = if total > 0 {
        (step as f64 / total as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let [g, info] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
    Gauge::default()
        .ratio(ratio)
        .label(format!("{status} · step {step}/{total} · {:.0}%", ratio * 100.0))
        .gauge_style(t.style(Role::Accent))
        .render(g, buf);
    let eta = ft.eta_secs().map_or("–".into(), fmt_secs);
    let f = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.4}"));
    let mut ls = vec![Line::from(vec![
        Span::styled("loss ", t.style(Role::Muted)),
        Span::styled(f(last.map(|p| p.loss)), t.style(Role::Text)),
        Span::styled("  eval ", t.style(Role::Muted)),
        Span::styled(f(ft.history.iter().rev().find_map(|p| p.eval_loss)), t.style(Role::Text)),
        Span::styled("  lr ", t.style(Role::Muted)),
        Span::styled(last.map_or("–".into(), |p| format!("{:.1e}", p.lr)), t.style(Role::Text)),
    ])];
    ls.push(Line::from(vec![
        Span::styled("tok/s ", t.style(Role::Muted)),
        Span::styled(last.map_or("–".into(), |p| short(p.tokens_per_s)), t.style(Role::Text)),
        Span::styled("  grad ", t.style(Role::Muted)),
        Span::styled(last.map_or("–".into(), |p| format!("{:.3}", p.grad_norm)), t.style(Role::Text)),
        Span::styled("  ETA ", t.style(Role::Muted)),
        Span::styled(eta, t.style(Role::Text)),
    ]));
    if let Some(r) = last.and_then(|p| p.pref.as_ref()) {
        ls.push(Line::from(vec![
            Span::styled("rewards ", t.style(Role::Muted)),
            Span::styled(format!("{:+.3}", r.reward_chosen), t.style(Role::Success)),
            Span::styled(" / ", t.style(Role::Muted)),
            Span::styled(format!("{:+.3}", r.reward_rejected), t.style(Role::Warning)),
            Span::styled("  margin ", t.style(Role::Muted)),
            Span::styled(format!("{:+.3}", r.margin), t.style(Role::Text)),
            Span::styled("  acc ", t.style(Role::Muted)),
            Span::styled(format!("{:.0}%", r.accuracy * 100.0), t.style(Role::Text)),
        ]));
    }
    if let Some(r) = &ft.routing_shift {
        let per: Vec<String> = r.layers.iter().map(|(l, moved, _)| format!("{l}:{:.1}%", 100.0 * moved)).collect();
        ls.push(Line::from(vec![
            Span::styled("routing moved ", t.style(Role::Muted)),
            Span::styled(per.join(" "), t.style(Role::Text)),
        ]));
    }
    if let Some(p) = &ft.saved {
        ls.push(Line::from(Span::styled(
            format!("adapter saved to {}", sanitize(&p.display().to_string())),
            t.style(Role::Success),
        )));
    }
    lines(info, buf, ls);
}

/// `1h02m`, `3m05s`, `42s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn probe_routing(app: &App, ft: &FinetuneState, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "Probe prompt routing: before │ after", false, area, buf);
    if inner.is_empty() {
        return;
    }
    if ft.probe_before.is_none() && ft.probe_after.is_none() {
        put(
            buf,
            inner,
            inner.x,
            inner.y,
            "experts of a fixed probe prompt per MoE layer, once a run starts",
            t.style(Role::Muted),
        );
        return;
    }
    let [a, b] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    for (r, area) in [(&ft.probe_before, a), (&ft.probe_after, b)] {
        let Some(r) = r else {
            put(buf, area, area.x, area.y, "–", t.style(Role::Muted));
            continue;
        };
        mini_heatmap(app, r, area, buf);
    }
}

/// Layers (rows) × tokens (columns), one cell per token, the expert's colour and id.
fn mini_heatmap(app: &App, r: &ProbeRouting, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    for (row, experts) in r.experts.iter().enumerate().take(usize::from(area.height)) {
        let y = area.y + row as u16;
        for (c, &e) in experts.iter().enumerate().take(usize::from(area.width.saturating_sub(1))) {
            let e = usize::from(e);
            put(buf, area, area.x + c as u16, y, &format!("{}", e % 10), t.expert_cell(e));
        }
    }
}

/// Keys of the fine-tune form.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Up), Chord::ch('k')], "previous field", |app, _, _| {
        app.ft.sel = app.ft.sel.saturating_sub(1);
    })
    .legend("field"),
    bind(&[Chord::key(KeyCode::Down), Chord::ch('j')], "next field", |app, _, _| {
        app.ft.sel = (app.ft.sel + 1).min(FIELDS.len() - 1);
    }),
    bind(
        &[Chord::key(KeyCode::Left), Chord::ch('h'), Chord::ch('-')],
        "smaller value",
        |app, _, _| {
            app.ft.adjust(app.ft.sel, -1);
        },
    )
    .legend("change"),
    bind(
        &[Chord::key(KeyCode::Right), Chord::ch('l'), Chord::ch('+')],
        "larger value",
        |app, _, _| {
            app.ft.adjust(app.ft.sel, 1);
        },
    ),
    bind(&[Chord::key(KeyCode::Enter)], "type a path or list; step a value", |app, _, _| {
        let i = app.ft.sel;
        if FinetuneState::is_text(i) {
            app.ft.editing = Some(Editor::new(&app.ft.value(i)));
        } else {
            app.ft.adjust(i, 1);
        }
    })
    .legend("edit"),
    bind(&[Chord::ch('s')], "start a run", |app, _, out| {
        let spec = Box::new(app.ft.spec.clone());
        send(app, FinetuneCommand::Start(spec), out);
    })
    .legend("start"),
    bind(&[Chord::ch('p')], "pause / resume", |app, _, out| {
        let c = if app.ft.status == FinetuneStatus::Paused {
            FinetuneCommand::Resume
        } else {
            FinetuneCommand::Pause
        };
        send(app, c, out);
    })
    .legend("pause"),
    bind(&[Chord::ch('x')], "stop the run", |app, _, out| {
        send(app, FinetuneCommand::Stop, out)
    })
    .legend("stop"),
    bind(&[Chord::ch('w')], "save the adapter", |app, _, out| {
        send(app, FinetuneCommand::Save, out)
    })
    .legend("save"),
    bind(&[Chord::ch('u')], "chat with the fine-tuned / base weights", |app, _, out| {
        let on = !app.ft.using_finetuned;
        send(app, FinetuneCommand::UseFinetuned(on), out);
    })
    .legend("use tuned"),
];

/// Keys while a field is typed into; other keys edit it.
pub const FIELD_KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Enter)], "set the field", |app, _, _| {
        if let Some(ed) = app.ft.editing.take() {
            app.ft.set_text(app.ft.sel, &ed.text);
        }
    })
    .legend("set"),
    bind(&[Chord::key(KeyCode::Esc)], "keep the old value", |app, _, _| app.ft.editing = None).legend("cancel"),
];

/// The help section of this view.
pub fn help() -> Section {
    let mut s = section("Fine-tune", KEYS, &[]);
    s.lines.extend(section("", FIELD_KEYS, &[]).lines);
    s
}

/// The keys the legend line shows now.
pub fn legend(app: &App) -> &'static [Binding<KeyAction>] {
    if app.ft.editing.is_some() {
        FIELD_KEYS
    } else {
        KEYS
    }
}

/// A key in this view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(legend(app), &k) {
        (b.action)(app, k, out);
    } else if let Some(ed) = app.ft.editing.as_mut() {
        edit(ed, k);
    }
}

/// Sends a fine-tuning command; a new run forgets the last one's charts.
fn send(app: &mut App, c: FinetuneCommand, out: &mut Vec<Command>) {
    if matches!(c, FinetuneCommand::Start(_)) {
        app.ft.history.clear();
        app.ft.probe_before = None;
        app.ft.probe_after = None;
        app.ft.saved = None;
        app.ft.routing_shift = None;
    }
    app.ft.awaiting = true;
    out.push(Command::Finetune(c));
}
