//! The model picker overlay (Ctrl-K): one row per loadable model with its size and whether it
//! loads now, a typed entry for any folder / hub id / random shape, the device and dtype to load
//! on, the weight format (Ctrl-F), and what choosing the selected row will do. Opened from the
//! compare view (`m`), Enter compares the chosen model with the current one instead of loading it.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Widget};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::catalog::{human_bytes, human_count, Availability, ModelChoice};
use crate::engine::protocol::{Command, CompareWith};
use crate::tui::app::{bind, App, KeyAction, Loading};
use crate::tui::editor::edit;
use crate::tui::keymap::{find, section, step_in, Binding, Chord, Section};
use crate::tui::picker::{PickTarget, Picker, PickerAction};
use crate::tui::text::{clip, fit, sanitize, width, wrap};
use crate::tui::theme::Role;
use crate::tui::widgets::{framed, lines};

/// Title of the overlay.
pub const TITLE: &str = "Model: Enter loads, Esc closes";

/// Title of the overlay when it picks model B of a comparison.
pub const TITLE_COMPARE: &str = "Compare with: Enter runs the text through both, Esc closes";

/// Bytes per parameter of a dtype name, or of the weight format when one is picked (scales and
/// the parts kept dense not counted).
fn dtype_bytes(dtype: &str, format: Option<crate::quant::QuantFormat>) -> f64 {
    match format {
        Some(f) => f.bits() as f64 / 8.0,
        None if dtype == "f32" => 4.0,
        None => 2.0,
    }
}

/// Draws the picker over `body`: as tall as its content, at the top.
pub fn render(app: &App, body: Rect, buf: &mut Buffer) {
    let p = &app.picker;
    let w = body.width.saturating_sub(4).min(96).max(body.width.min(20));
    let iw = usize::from(w.saturating_sub(2));
    let foot = footer(app, p, iw);
    let rows = p.choices().len() + 1 + usize::from(p.catalog.is_none());
    // frame + header + rows + blank + footer
    let want = 2 + 1 + rows + 1 + foot.len();
    let h = body.height.min(u16::try_from(want).unwrap_or(u16::MAX));
    let area = Rect::new(body.x + (body.width - w) / 2, body.y, w, h);
    Clear.render(area, buf);
    let title = match p.target {
        PickTarget::Load => TITLE,
        PickTarget::Compare => TITLE_COMPARE,
    };
    let inner = framed(app, title, true, area, buf);
    if inner.is_empty() {
        return;
    }
    let t = &app.theme;
    // the list gets what the footer leaves (at least the header and one row)
    let list_h = usize::from(inner.height)
        .saturating_sub(foot.len() + 1)
        .max(2.min(usize::from(inner.height)));
    let name_w = p
        .choices()
        .iter()
        .map(|c| width(&c.name) + 2)
        .max()
        .unwrap_or(8)
        .clamp(8, (iw / 2).max(8));
    let cols = iw.saturating_sub(name_w + 2);
    let mut out: Vec<Line<'_>> = vec![Line::from(Span::styled(
        clip(
            &format!("  {:<name_w$}{}", "MODEL", columns("PARAMS (ACTIVE)", "MEMORY", "STATUS", cols)),
            iw,
        ),
        t.style(Role::Muted),
    ))];
    let n = p.choices().len() + 1;
    let body_rows = list_h.saturating_sub(1);
    let first = p.sel.saturating_sub(body_rows.saturating_sub(1)).min(n.saturating_sub(body_rows));
    let current = app.model.as_ref().map(|m| m.label.as_str());
    if p.catalog.is_none() && body_rows > 1 {
        out.push(Line::from(Span::styled("  asking the engine for the list…", t.style(Role::Muted))));
    }
    for i in (first..n).take(body_rows) {
        let sel = i == p.sel;
        match p.choices().get(i) {
            Some(c) => out.push(choice_row(app, c, current == Some(c.label.as_str()), sel, name_w, cols, p)),
            None => out.push(other_row(p, sel, app, iw)),
        }
    }
    while out.len() < list_h + 1 && out.len() + foot.len() < usize::from(inner.height) {
        out.push(Line::default());
    }
    out.extend(foot);
    lines(inner, buf, out);
}

/// Widths of the PARAMS (ACTIVE) and MEMORY columns.
const PARAMS_W: usize = 16;
const MEMORY_W: usize = 9;

fn columns(params: &str, memory: &str, status: &str, w: usize) -> String {
    fit(&format!("{params:<PARAMS_W$}{memory:<MEMORY_W$}{status}"), w)
}

fn choice_row<'a>(app: &App, c: &ModelChoice, loaded: bool, sel: bool, name_w: usize, cols: usize, p: &Picker) -> Line<'a> {
    let t = &app.theme;
    let base = if sel { t.style(Role::Selection) } else { t.style(Role::Text) };
    let mark = if loaded { "● " } else { "  " };
    let params = c.params.map_or_else(
        || "?".into(),
        |(total, active)| format!("{} ({})", human_count(total), human_count(active)),
    );
    let memory = c.params.map_or_else(
        || "?".into(),
        |(total, _)| human_bytes(total as f64 * dtype_bytes(&p.dtype, p.format)),
    );
    let status = c.availability.short();
    let status_role = match c.availability {
        Availability::Ready => Role::Success,
        Availability::Convert | Availability::Download { .. } => Role::Warning,
        Availability::Unavailable { .. } => Role::Error,
    };
    let lead = fit(&format!("{params:<PARAMS_W$}{memory:<MEMORY_W$}"), (PARAMS_W + MEMORY_W).min(cols));
    let status_w = cols.saturating_sub(PARAMS_W + MEMORY_W);
    let pick = |r: Role| if sel { base } else { t.style(r) };
    Line::from(vec![
        Span::styled(mark, pick(Role::Success)),
        Span::styled(fit(&sanitize(&c.name), name_w), base),
        Span::styled(lead, if sel { base } else { t.style(Role::Muted) }),
        Span::styled(fit(&status, status_w), pick(status_role)),
    ])
}

/// The typed entry: `other: TEXT` with a cursor when selected (the end of a long text shows).
fn other_row<'a>(p: &Picker, sel: bool, app: &App, w: usize) -> Line<'a> {
    let style = if sel {
        app.theme.style(Role::Selection)
    } else {
        app.theme.style(Role::Text)
    };
    let cursor = app.theme.style(Role::Cursor);
    let label = "  other: ";
    let room = w.saturating_sub(label.len() + 1);
    let text = sanitize(&p.other.text);
    if !sel {
        let shown = if text.is_empty() {
            "a folder, owner/name[@revision] or random:SHAPE[@seed]".to_string()
        } else {
            text
        };
        return Line::from(Span::styled(clip(&format!("{label}{shown}"), w), style));
    }
    let at = p.other.cursor.min(p.other.text.len());
    let before = sanitize(p.other.text.get(..at).unwrap_or_default());
    let after = sanitize(p.other.text.get(at..).unwrap_or_default());
    let mut chars = after.chars();
    let under = chars.next().map_or_else(|| " ".to_string(), |c| c.to_string());
    let rest: String = chars.collect();
    // keep the cursor in view: drop characters from the left
    let before: String = {
        let cs: Vec<char> = before.chars().collect();
        cs[cs.len().saturating_sub(room.saturating_sub(1))..].iter().collect()
    };
    Line::from(vec![
        Span::styled(label, style),
        Span::styled(before, style),
        Span::styled(under, cursor),
        Span::styled(rest, style),
    ])
}

/// What the selected row does, where it runs, and where the cache is.
fn footer<'a>(app: &App, p: &Picker, w: usize) -> Vec<Line<'a>> {
    let t = &app.theme;
    let mut out = Vec::new();
    let about = match p.choices().get(p.sel) {
        Some(c) => {
            let mut s = sanitize(&c.about);
            match &c.availability {
                Availability::Ready => {}
                Availability::Convert => {
                    s.push_str("; the first load converts pytorch_model.bin to safetensors beside it (once), later loads map it")
                }
                Availability::Download { missing } => {
                    s.push_str(&format!("; loading downloads {} into the hub cache", missing.join(" and ")));
                }
                Availability::Unavailable { reason } => s = format!("{s}; cannot load now: {}", sanitize(reason)),
            }
            s
        }
        None => "a folder with config.json and the weights, a hub id such as Zyphra/BlackMamba-2.8B@main, or random:tiny|1.5b|2.8b[@seed]"
            .into(),
    };
    let mut about_lines = wrap(&[(about, t.style(Role::Text))], w, "");
    about_lines.truncate(3);
    out.extend(about_lines);
    out.push(Line::from(vec![
        Span::styled("load on ", t.style(Role::Muted)),
        Span::styled(format!("‹ {} {} ›", p.device, p.dtype), t.style(Role::Accent)),
        Span::styled(
            if p.catalog.as_ref().is_some_and(|c| c.cuda) {
                "  Tab changes"
            } else {
                "  Tab changes (this build has no CUDA)"
            },
            t.style(Role::Muted),
        ),
    ]));
    out.push(Line::from(vec![
        Span::styled("weights ", t.style(Role::Muted)),
        Span::styled(format!("‹ {} ›", p.format_name()), t.style(Role::Accent)),
        Span::styled("  Ctrl-F changes (int8, fp8, q4, q4g128: BlackMamba)", t.style(Role::Muted)),
    ]));
    if let Some(c) = &p.catalog {
        let mode = if c.offline { "offline: cache only" } else { "online" };
        let hub = if c.cache_dir.as_os_str().is_empty() {
            "no hub settings: local models only".to_string()
        } else {
            format!("hub cache {} ({mode})", sanitize(&c.cache_dir.display().to_string()))
        };
        out.push(Line::from(Span::styled(clip(&hub, w), t.style(Role::Muted))));
    }
    if !app.chat.messages.is_empty() && p.target == PickTarget::Load {
        out.push(Line::from(Span::styled(
            "loading another model ends this chat",
            t.style(Role::Warning),
        )));
    }
    out
}

/// Keys of the open picker.
pub const KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Up)], "previous model", |app, _, _| {
        app.picker.sel = step_in(app.picker.sel, -1, app.picker.rows());
    })
    .legend("model"),
    bind(&[Chord::key(KeyCode::Down)], "next model", |app, _, _| {
        app.picker.sel = step_in(app.picker.sel, 1, app.picker.rows());
    }),
    bind(&[Chord::key(KeyCode::PageUp)], "first model", |app, _, _| app.picker.sel = 0),
    bind(&[Chord::key(KeyCode::PageDown)], "the typed entry", |app, _, _| {
        app.picker.sel = app.picker.rows() - 1;
    }),
    bind(
        &[Chord::key(KeyCode::Enter)],
        "load the selected model (a new chat starts on it)",
        |app, _, out| {
            let action = app.picker.choose();
            load(app, action, out);
        },
    )
    .legend("load"),
    bind(&[Chord::key(KeyCode::Tab)], "next device and dtype to load on", |app, _, _| {
        app.picker.cycle_runtime(1)
    })
    .legend("device, dtype"),
    bind(&[Chord::key(KeyCode::BackTab)], "previous device and dtype", |app, _, _| {
        app.picker.cycle_runtime(-1)
    }),
    bind(
        &[Chord::ctrl('f')],
        "next weight format for the model loaded: as loaded, int8, fp8, q4, q4g128",
        |app, _, _| app.picker.cycle_format(1),
    )
    .legend("format"),
    bind(
        &[Chord::key(KeyCode::Esc), Chord::ctrl('k')],
        "close; the current model stays",
        |app, _, _| app.picker.open = false,
    )
    .legend("close"),
];

/// Keys on a model row (on the typed entry, they edit the text instead).
pub const LIST_KEYS: &[Binding<KeyAction>] = &[
    bind(&[Chord::key(KeyCode::Home)], "first model", |app, _, _| app.picker.sel = 0),
    bind(&[Chord::key(KeyCode::End)], "the typed entry", |app, _, _| {
        app.picker.sel = app.picker.rows() - 1;
    }),
    bind(&[Chord::key(KeyCode::Left)], "previous device and dtype", |app, _, _| {
        app.picker.cycle_runtime(-1)
    }),
    bind(&[Chord::key(KeyCode::Right)], "next device and dtype", |app, _, _| {
        app.picker.cycle_runtime(1)
    }),
];

/// The help section of the picker.
pub fn help() -> Section {
    let mut s = section("Model picker (Ctrl-K)", KEYS, &[]);
    s.lines.extend(
        section(
            "",
            LIST_KEYS,
            &[("typing", "a folder, owner/name[@revision] or random:SHAPE[@seed]")],
        )
        .lines,
    );
    s
}

/// Ctrl-K: opens the picker and asks the engine for the list of models.
pub fn open(app: &mut App, out: &mut Vec<Command>) {
    if app.fatal.is_some() {
        app.notify("the engine has stopped; quit with Ctrl-Q", true);
        return;
    }
    // the engine answers nothing until a load ends
    if let Some(name) = &app.switching {
        app.notify(format!("{name} is loading; Ctrl-K works once it is ready"), false);
        return;
    }
    if app.model.is_none() {
        app.notify("the model is still loading; Ctrl-K works once it is ready", false);
        return;
    }
    app.picker.open(app.model.as_ref());
    out.push(Command::ListModels);
}

/// A key while the picker is open.
pub fn key(app: &mut App, k: KeyEvent, out: &mut Vec<Command>) {
    if let Some(b) = find(KEYS, &k) {
        (b.action)(app, k, out);
        return;
    }
    if app.picker.on_other() {
        edit(&mut app.picker.other, k);
        return;
    }
    if let Some(b) = find(LIST_KEYS, &k) {
        (b.action)(app, k, out);
        return;
    }
    // typing on a choice starts the typed entry
    if let KeyCode::Char(c) = k.code {
        if !k.modifiers.intersects(KeyModifiers::CONTROL | KeyModifiers::ALT) {
            app.picker.sel = app.picker.choices().len();
            app.picker.other.insert(c.encode_utf8(&mut [0; 4]));
        }
    }
}

/// Enter: loads the chosen model, or says why not.
fn load(app: &mut App, action: PickerAction, out: &mut Vec<Command>) {
    let (spec, name) = match action {
        PickerAction::Refuse(why) => {
            app.notify(why, true);
            return;
        }
        PickerAction::Load(spec, name) => (spec, name),
    };
    if app.picker.target == PickTarget::Compare {
        app.picker.open = false;
        crate::tui::compare_state::request(app, CompareWith::Model(spec), name, out);
        return;
    }
    let same = app.model.as_ref().is_some_and(|m| {
        spec.revision.is_none()
            && crate::loader::ModelSource::parse(spec.model.as_deref(), None).is_ok_and(|s| s.label() == m.label)
            && spec.device.as_deref() == Some(m.device.as_str())
            && spec.dtype.as_deref() == Some(m.dtype.as_str())
            && spec.quant.as_ref().map(|q| q.format.name()) == m.quant
    });
    if same {
        app.picker.open = false;
        app.notify(
            format!(
                "{name} is already loaded ({} {}, {})",
                app.picker.device,
                app.picker.dtype,
                app.picker.format_name()
            ),
            false,
        );
        return;
    }
    if !app.ready() {
        return;
    }
    app.picker.open = false;
    app.loading = Some(Loading {
        stage: format!("loading {name}"),
        done: 0,
        total: 1,
    });
    app.switching = Some(name);
    out.push(Command::Load(spec));
}
