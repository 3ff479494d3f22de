//! The Sinkhorn view: for each MoE layer, both Sinkhorn variants run over the router logits of the
//! last N tokens (or, while fine-tuning, the batch that routed the last step): convergence curves
//! on a log scale, iterations, loads balanced vs greedy, and the share of tokens that move.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};

use crate::engine::protocol::{SinkhornLayer, SinkhornOrigin, SinkhornReport};
use crate::sinkhorn::Variant;
use crossterm::event::{KeyCode, KeyEvent};

use crate::engine::protocol::Command;
use crate::tui::app::{bind, App, KeyAction};
use crate::tui::keymap::{find, section, step_in, Binding, Chord, Section};
use crate::tui::theme::Role;
use crate::tui::widgets::{bar, framed, line_chart, lines, Series};

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let report = if app.sink.show_train {
        app.sink.train.as_deref()
    } else {
        app.sink.chat.as_deref()
    };
    let inner = framed(app, "Sinkhorn", false, area, buf);
    if inner.is_empty() {
        return;
    }
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
    let source = match report.map(|r| r.origin) {
        Some(SinkhornOrigin::Finetune { step }) => format!("training batch of step {step}"),
        _ if app.sink.show_train => "training batch (none yet)".to_string(),
        _ => format!("last N = {} tokens of the chat", app.sink.window),
    };
    let used = report.map_or(0, |r| r.n_tokens);
    lines(
        head,
        buf,
        vec![Line::from(vec![
            Span::styled(source, t.style(Role::Accent)),
            Span::styled(
                match report.map(|r| r.origin) {
                    // the trainer's own Sinkhorn settings, not the chat window's
                    Some(SinkhornOrigin::Finetune { .. }) => format!(" · {used} tokens · the run that routed them"),
                    _ => format!(" · {used} used · tol {:.0e} · ≤{} iters", app.sink.tol, app.sink.max_iters),
                },
                t.style(Role::Muted),
            ),
        ])],
    );
    let Some(r) = report.filter(|r| !r.layers.is_empty() && r.n_tokens > 0) else {
        let msg = if app.sink.show_train {
            "Sinkhorn of training batches appears here while fine-tuning (t: back to the chat window)"
        } else {
            "no router logits yet: chat first (the view updates after every answer)"
        };
        lines(
            body,
            buf,
            vec![Line::default(), Line::from(Span::styled(msg, t.style(Role::Muted)))],
        );
        return;
    };
    let slot = app.sink.layer.min(r.layers.len() - 1);
    let layer = &r.layers[slot];
    let summary_h = (r.layers.len() as u16 + 3).min(body.height / 3).max(3.min(body.height));
    let [top, bottom] = Layout::vertical([Constraint::Min(3), Constraint::Length(summary_h)]).areas(body);
    let wide = top.width >= 70;
    let [chart, detail] = if wide {
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(top)
    } else {
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top)
    };
    convergence(app, layer, chart, buf);
    loads(app, layer, detail, buf);
    summary(app, r, slot, bottom, buf);
}

fn convergence(app: &App, layer: &SinkhornLayer, area: Rect, buf: &mut Buffer) {
    let mut series = Vec::new();
    let names = [["Z Δd1", "Z row err"], ["S Δd1", "S row err"]];
    for run in layer.runs.iter().take(2) {
        let k = slot_of(run.variant);
        let pts = |v: &[f32]| v.iter().enumerate().map(|(i, &y)| ((i + 1) as f64, f64::from(y))).collect();
        series.push(Series {
            name: names[k][0],
            points: pts(&run.rel_change),
            color: 2 * k,
        });
        series.push(Series {
            name: names[k][1],
            points: pts(&run.row_err),
            color: 2 * k + 1,
        });
    }
    let title = format!("Convergence, layer {} (log)", layer.layer);
    line_chart(app, &title, "iteration", &series, true, area, buf);
}

fn loads(app: &App, layer: &SinkhornLayer, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, &format!("Expert loads, layer {}", layer.layer), false, area, buf);
    let n: usize = layer.greedy_loads.iter().sum();
    let mut ls = Vec::new();
    for run in &layer.runs {
        ls.push(Line::from(vec![
            Span::styled(format!("{:<9}", run.variant.name()), t.style(Role::Accent)),
            Span::styled(
                format!(
                    "{:>4} it{} moves {:.0}%",
                    run.iters(),
                    if run.converged { " ✓" } else { "s ✗" },
                    100.0 * run.changed as f64 / n.max(1) as f64
                ),
                t.style(Role::Text),
            ),
        ]));
    }
    // more experts than rows (a 64-expert layer): the busiest under any of the assignments
    let room = usize::from(inner.height).saturating_sub(ls.len() + 1);
    let load_of = |e: usize| {
        std::iter::once(layer.greedy_loads.get(e).copied().unwrap_or(0))
            .chain(layer.runs.iter().map(|r| r.loads.get(e).copied().unwrap_or(0)))
            .max()
            .unwrap_or(0)
    };
    let mut shown: Vec<usize> = (0..layer.n_experts).collect();
    if shown.len() > room {
        shown.sort_by(|&a, &b| load_of(b).cmp(&load_of(a)).then(a.cmp(&b)));
        shown.truncate(room);
    }
    let mut head = if shown.len() < layer.n_experts {
        format!("busiest {} of {}: greedy", shown.len(), layer.n_experts)
    } else {
        String::from("expert  greedy")
    };
    for run in &layer.runs {
        head.push_str(match run.variant {
            Variant::Zyphra => " │ Zyphra",
            Variant::Standard => " │ standard",
        });
    }
    ls.push(Line::from(Span::styled(head, t.style(Role::Muted))));
    let max = layer
        .greedy_loads
        .iter()
        .chain(layer.runs.iter().flat_map(|r| r.loads.iter()))
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let bw = (usize::from(inner.width).saturating_sub(8) / 3).saturating_sub(1).clamp(1, 12);
    let id_w = if layer.n_experts > 10 { 2 } else { 1 };
    for &e in &shown {
        let mut spans = vec![Span::styled(format!(" {e:>id_w$} "), t.expert_cell(e)), Span::raw(" ")];
        let vals = std::iter::once(layer.greedy_loads.get(e).copied().unwrap_or(0))
            .chain(layer.runs.iter().map(|r| r.loads.get(e).copied().unwrap_or(0)));
        for (k, v) in vals.enumerate() {
            if k > 0 {
                spans.push(Span::styled("│", t.style(Role::Muted)));
            }
            spans.push(Span::styled(bar(v as f64, max, bw), t.expert_text(e)));
        }
        ls.push(Line::from(spans));
    }
    lines(inner, buf, ls);
}

fn summary(app: &App, r: &SinkhornReport, slot: usize, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = framed(app, "All MoE layers", false, area, buf);
    let mut ls = vec![Line::from(Span::styled(
        "layer  iters Z/S   moved Z/S   busiest expert: greedy → Z / S",
        t.style(Role::Muted),
    ))];
    let share = |l: &[usize]| {
        let n: usize = l.iter().sum();
        100.0 * l.iter().copied().max().unwrap_or(0) as f64 / n.max(1) as f64
    };
    for (k, layer) in r.layers.iter().enumerate() {
        let n = layer.greedy_loads.iter().sum::<usize>().max(1) as f64;
        // column 0 is Zyphra's run, column 1 the standard one (training has only its own)
        let run_in = |i: usize| layer.runs.iter().find(|r| slot_of(r.variant) == i);
        let it = |i: usize| run_in(i).map_or("–".into(), |x| format!("{}{}", x.iters(), if x.converged { "" } else { "+" }));
        let mv = |i: usize| run_in(i).map_or("–".into(), |x| format!("{:.0}%", 100.0 * x.changed as f64 / n));
        let sh = |i: usize| run_in(i).map_or("–".into(), |x| format!("{:.0}%", share(&x.loads)));
        let style = if k == slot { t.style(Role::Selection) } else { t.style(Role::Text) };
        ls.push(Line::from(Span::styled(
            format!(
                "L{:<4} {:>5}/{:<5} {:>5}/{:<5} {:>5.0}% → {} / {}",
                layer.layer,
                it(0),
                it(1),
                mv(0),
                mv(1),
                share(&layer.greedy_loads),
                sh(0),
                sh(1)
            ),
            style,
        )));
    }
    let h = usize::from(inner.height);
    let skip = (slot + 2).saturating_sub(h);
    let mut shown: Vec<Line<'_>> = ls.drain(..1).collect();
    shown.extend(ls.into_iter().skip(skip));
    lines(inner, buf, shown);
}

/// The chart and summary column of a variant's run.
fn slot_of(v: Variant) -> usize {
    match v {
        Variant::Zyphra => 0,
        Variant::Standard => 1,
    }
}

/// Keys of the Sinkhorn view.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Left), Chord::ch('h')], "previous MoE layer", |app, _, _| {
        app.sink.layer = step_in(app.sink.layer, -1, app.moe_count());
    })
    .legend("layer"),
    bind(&[Chord::key(KeyCode::Right), Chord::ch('l')], "next MoE layer", |app, _, _| {
        app.sink.layer = step_in(app.sink.layer, 1, app.moe_count());
    }),
    bind(
        &[Chord::ch('+'), Chord::ch('='), Chord::key(KeyCode::Up)],
        "double the window N",
        |app, _, out| {
            app.sink.window = (app.sink.window * 2).min(4096);
            out.push(app.sinkhorn_cmd());
        },
    )
    .legend("window"),
    bind(&[Chord::ch('-'), Chord::key(KeyCode::Down)], "halve the window N", |app, _, out| {
        app.sink.window = (app.sink.window / 2).max(4);
        out.push(app.sinkhorn_cmd());
    }),
    bind(&[Chord::ch('r')], "run again", |app, _, out| out.push(app.sinkhorn_cmd())).legend("rerun"),
    bind(&[Chord::ch('t')], "show the chat window or the last training batch", |app, _, _| {
        app.sink.show_train = !app.sink.show_train;
    })
    .legend("chat/training"),
];

/// The help section of this view.
pub fn help() -> Section {
    section("Sinkhorn: balanced routing of the last N tokens", KEYS, &[])
}

/// A key in this view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(KEYS, &k) {
        (b.action)(app, k, out);
    }
}
