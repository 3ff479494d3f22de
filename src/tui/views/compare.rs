//! The compare view (F6): one text, two models' routes side by side. Model A is the chat's model,
//! model B one from the picker (`m`: any family) or the same model in another weight format (`f`,
//! also the routing view's `c`). Two heatmaps (tokens × MoE layers, coloured by the first expert;
//! B's rows are the tokens aligned with A's, and when both have the same experts a B cell whose
//! expert differs from A's is marked `*`, bold and underlined) and a per-layer strip: routing flips (the share of aligned
//! tokens whose first expert differs), the Jaccard overlap of the expert sets for top-k models,
//! the NMI of the two first experts and each side's load balance (CV).

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};

use crossterm::event::{KeyCode, KeyEvent};

use crate::engine::compare::{CompareReport, CompareSide};
use crate::engine::protocol::Command;
use crate::tui::app::{bind, App, KeyAction};
use crate::tui::compare_state::{format_target, request};
use crate::tui::keymap::{find, section, Binding, Chord, Section};
use crate::tui::picker::PickTarget;
use crate::tui::text::{fit, one_line, sanitize, wrap};
use crate::tui::theme::Role;
use crate::tui::widgets::{bar, framed, lines, put};

const LABEL_W: usize = 10;

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let Some(r) = app.cmp.report.as_deref() else {
        let inner = framed(app, "Compare", false, area, buf);
        let mut ls = Vec::new();
        if let Some(what) = &app.cmp.pending {
            ls.push(Line::from(Span::styled(
                format!("comparing with {}…", sanitize(what)),
                t.style(Role::Accent),
            )));
        }
        for s in [
            "Two models' routes over the chat's text (a built-in paragraph while the chat is empty).",
            "m  pick model B (any model the picker offers: BlackMamba, OLMoE, Mixtral)",
            "f  model B = this model in another weight format (int8 unless the picker's Ctrl-F chose one; a quantised model: its dense weights)",
        ] {
            ls.extend(wrap(&[(s.to_string(), t.style(Role::Muted))], usize::from(inner.width), "   "));
        }
        lines(inner, buf, ls);
        return;
    };
    let strip_h = (r.layers.len() + 3) as u16;
    let [head, grids, strip_a] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(3),
        Constraint::Length(strip_h.min(area.height / 2)),
    ])
    .areas(area);
    header(app, r, head, buf);
    let [ga, gb] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(grids);
    let title_a = format!("A: {}", sanitize(&r.a.label));
    let title_b = format!("B: {}", sanitize(&r.b.label));
    let inner_a = framed(app, &title_a, false, ga, buf);
    let inner_b = framed(app, &title_b, false, gb, buf);
    let rows = usize::from(inner_a.height.saturating_sub(1));
    let n = r.a.pieces.len();
    let sel = app.cmp.sel.min(n.saturating_sub(1));
    let start = sel.saturating_sub(rows / 2).min(n.saturating_sub(rows));
    let shown: Vec<usize> = (start..n).take(rows).collect();
    grid(
        app,
        r,
        &r.a,
        &shown.iter().map(|&i| Some(i)).collect::<Vec<_>>(),
        sel,
        None,
        inner_a,
        buf,
    );
    let partners: Vec<Option<usize>> = shown.iter().map(|&i| r.partner(i)).collect();
    grid(app, r, &r.b, &partners, sel, Some(&shown), inner_b, buf);
    strip(app, r, strip_a, buf);
}

fn header(app: &App, r: &CompareReport, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let name = |s: &CompareSide| format!("{} {}", s.family, s.format);
    let how = if r.same_tokens {
        "token by token".to_string()
    } else {
        format!("by character spans ({} pairs)", r.pairs.len())
    };
    let first = format!(
        "A {} · B {} · {} / {} tokens, aligned {how}",
        name(&r.a),
        name(&r.b),
        r.a.pieces.len(),
        r.b.pieces.len()
    );
    put(buf, area, area.x, area.y, &first, t.style(Role::Text));
    let mut second = match &app.cmp.pending {
        Some(what) => format!("comparing with {}…", sanitize(what)),
        None => String::new(),
    };
    if second.is_empty() && !r.same_experts() {
        second = "different models: their expert ids name different experts; NMI says how alike they group tokens".into();
    }
    put(buf, area, area.x, area.y + 1, &second, t.style(Role::Muted));
}

/// One side's heatmap: a row per token (`rows`: indices into the side's tokens, `None` for a row
/// with no aligned token), a column per MoE layer. On B's side (`a_rows` set) of two models with the
/// same experts, a cell whose first expert differs from A's is marked.
#[allow(clippy::too_many_arguments)]
fn grid(
    app: &App,
    r: &CompareReport,
    s: &CompareSide,
    rows: &[Option<usize>],
    sel: usize,
    a_rows: Option<&[usize]>,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = &app.theme;
    if area.is_empty() {
        return;
    }
    let cols = usize::from(area.width).saturating_sub(LABEL_W + 1);
    let cw = if s.layers.len() * 3 <= cols { 3 } else { 2 };
    put(buf, area, area.x, area.y, &fit("token", LABEL_W), t.style(Role::Muted));
    let mut x = area.x + LABEL_W as u16 + 1;
    for &l in &s.layers {
        put(buf, area, x, area.y, &fit(&format!("L{l}"), cw), t.style(Role::Muted));
        x += cw as u16;
    }
    for (row, tok) in rows.iter().enumerate() {
        let y = area.y + 1 + row as u16;
        let a_tok = a_rows.and_then(|a| a.get(row).copied());
        let selected = a_rows.map_or(*tok == Some(sel), |a| a.get(row) == Some(&sel));
        let Some(tok) = *tok else {
            put(buf, area, area.x, y, &fit("·", LABEL_W), t.style(Role::Muted));
            continue;
        };
        let style = if selected { t.style(Role::Selection) } else { t.style(Role::Text) };
        let piece = s.pieces.get(tok).map_or(String::new(), |p| one_line(p));
        put(buf, area, area.x, y, &fit(&piece, LABEL_W), style);
        let mut x = area.x + LABEL_W as u16 + 1;
        for m in 0..s.layers.len() {
            let Some(&e) = s.experts_of(m, tok).first() else {
                x += cw as u16;
                continue;
            };
            let e = usize::from(e);
            let mut cell = t.expert_cell(e);
            // B's cell against A's first expert in the layer matched to this one
            let flipped = r.same_experts()
                && a_tok.is_some_and(|at| {
                    r.layers
                        .iter()
                        .filter(|f| f.slot_b == m)
                        .any(|f| r.a.experts_of(f.slot_a, at).first().map(|&x| usize::from(x)) != Some(e))
                });
            if flipped {
                cell = cell.add_modifier(Modifier::UNDERLINED | Modifier::BOLD);
            }
            let text = if flipped && cw == 3 && e < 10 {
                format!(" {e}*")
            } else {
                format!("{e:^cw$}")
            };
            put(buf, area, x, y, &fit(&text, cw), cell);
            x += cw as u16;
        }
    }
}

/// The per-layer strip: flips, Jaccard, NMI and each side's CV.
fn strip(app: &App, r: &CompareReport, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let title = if r.same_model {
        format!("Routing flips, {} against {}", r.b.format, r.a.format)
    } else {
        "Routing against B, per MoE layer of A".to_string()
    };
    let inner = framed(app, &title, false, area, buf);
    let topk = r.layers.iter().any(|l| l.jaccard.is_some());
    let mut ls = vec![Line::from(Span::styled(
        format!("layer      flips           {}NMI   CV A  CV B", if topk { "Jacc  " } else { "" }),
        t.style(Role::Muted),
    ))];
    let bw = 8;
    for f in &r.layers {
        let la = r.a.layers.get(f.slot_a).copied().unwrap_or(0);
        let lb = r.b.layers.get(f.slot_b).copied().unwrap_or(0);
        let share = f.flip_share();
        let role = if share > 0.5 {
            Role::Error
        } else if share > 0.01 {
            Role::Warning
        } else {
            Role::Success
        };
        let mut spans = vec![
            Span::styled(format!("{:<10} ", format!("L{la}↔L{lb}")), t.style(Role::Muted)),
            Span::styled(bar(share, 1.0, bw), t.style(role)),
            Span::styled(format!(" {:>5.1}% ", share * 100.0), t.style(Role::Text)),
        ];
        if topk {
            let j = f.jaccard.map_or_else(|| "  –  ".to_string(), |j| format!("{j:.2} "));
            spans.push(Span::styled(format!("{j:<6}"), t.style(Role::Text)));
        }
        let cv_a = r.a.cv.get(f.slot_a).copied().unwrap_or(0.0);
        let cv_b = r.b.cv.get(f.slot_b).copied().unwrap_or(0.0);
        spans.push(Span::styled(format!("{:.2}  {cv_a:.2}  {cv_b:.2}", f.nmi), t.style(Role::Text)));
        ls.push(Line::from(spans));
    }
    lines(inner, buf, ls);
}

/// Keys of the compare view.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(
        &[Chord::ch('m')],
        "pick model B from the model picker (any family)",
        |app, _, out| {
            crate::tui::views::picker::open(app, out);
            if app.picker.open {
                app.picker.target = PickTarget::Compare;
            }
        },
    )
    .legend("model B"),
    bind(
        &[Chord::ch('f')],
        "model B = this model in another weight format (the picker's, else int8; quantised: dense)",
        |app, _, out| {
            let (with, what) = format_target(app);
            request(app, with, what, out);
        },
    )
    .legend("format"),
    bind(
        &[Chord::ch('r')],
        "run the last comparison again on the chat's text",
        |app, _, out| match app.cmp.last.clone() {
            Some(with) => {
                let what = app.cmp.report.as_ref().map_or_else(|| "model B".to_string(), |r| r.b.label.clone());
                request(app, with, what, out);
            }
            None => app.notify("nothing compared yet: m picks model B, f another weight format", false),
        },
    )
    .legend("again"),
    bind(&[Chord::key(KeyCode::Up), Chord::ch('k')], "previous token", |app, _, _| {
        app.cmp.move_sel(-1)
    })
    .legend("token"),
    bind(&[Chord::key(KeyCode::Down), Chord::ch('j')], "next token", |app, _, _| {
        app.cmp.move_sel(1)
    }),
    bind(&[Chord::key(KeyCode::PageUp)], "20 tokens back", |app, _, _| app.cmp.move_sel(-20)),
    bind(&[Chord::key(KeyCode::PageDown)], "20 tokens on", |app, _, _| app.cmp.move_sel(20)),
    bind(&[Chord::key(KeyCode::Home), Chord::ch('g')], "first token", |app, _, _| {
        app.cmp.sel = 0
    }),
    bind(&[Chord::key(KeyCode::End), Chord::ch('G')], "last token", |app, _, _| {
        app.cmp.move_sel(isize::MAX / 2)
    }),
];

/// The help section of this view.
pub fn help() -> Section {
    section(
        "Compare: the chat's model (A) against model B on the chat's text",
        KEYS,
        &[(
            "",
            "B cells underlined: first expert differs from A's; flips, Jaccard (top-k), NMI, CV per layer",
        )],
    )
}

/// A key in this view.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(KEYS, &k) {
        (b.action)(app, k, out);
    }
}
