#![allow(clippy::unwrap_used)]
//! The model picker (Ctrl-K) on the App, fed synthetic engine events: what it lists and sends,
//! what a switch does to the screen and the conversation, refusals, and snapshots of the overlay.

use std::path::PathBuf;

use blackmamba::catalog::{Availability, Catalog, ModelChoice};
use blackmamba::engine::protocol::{Command, CompareWith, EngineEvent, LoadSpec, ModelInfo};
use blackmamba::quant::QuantFormat;
use blackmamba::tui::app::{App, Msg, View};
use blackmamba::tui::demo;
use blackmamba::tui::picker::PickTarget;
use blackmamba::tui::theme::Theme;
use blackmamba::tui::ui;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| ui::draw(app, f.area(), f.buffer_mut())).unwrap();
    format!("{}", term.backend())
}

fn key(app: &mut App, code: KeyCode) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

fn ctrl(app: &mut App, c: char) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)))
}

fn choice(name: &str, arg: Option<&str>, params: Option<(usize, usize)>, availability: Availability) -> ModelChoice {
    ModelChoice {
        arg: arg.map(str::to_string),
        name: name.into(),
        label: arg
            .map_or("embedded", |a| if a.starts_with("random:") { name } else { a })
            .to_string(),
        about: format!("about {name}"),
        params,
        disk_bytes: None,
        untrained: name.starts_with("random:"),
        availability,
    }
}

/// What the engine would list: embedded, a cached-but-unconverted 2.8B, an unreachable 1.5B,
/// and one random shape.
fn catalog(cuda: bool) -> Box<Catalog> {
    Box::new(Catalog {
        choices: vec![
            choice("embedded", None, Some((10_200_000, 4_600_000)), Availability::Ready),
            choice(
                "Zyphra/BlackMamba-1.5B",
                Some("Zyphra/BlackMamba-1.5B"),
                Some((1_600_000_000, 630_000_000)),
                Availability::Unavailable {
                    reason: "HF_HUB_OFFLINE is set and config.json, pytorch_model.bin are not in /cache/models--Zyphra--BlackMamba-1.5B"
                        .into(),
                },
            ),
            choice(
                "Zyphra/BlackMamba-2.8B",
                Some("Zyphra/BlackMamba-2.8B"),
                Some((2_800_000_000, 960_000_000)),
                Availability::Convert,
            ),
            choice(
                "random:tiny",
                Some("random:tiny"),
                Some((6_900_000, 6_600_000)),
                Availability::Ready,
            ),
        ],
        cache_dir: PathBuf::from("/home/me/.cache/huggingface/hub"),
        offline: true,
        cuda,
    })
}

/// The embedded model after a short conversation, with the picker open and listed.
fn picker_app(cuda: bool) -> (App, ModelInfo) {
    let mut app = App::new(Theme::default_theme());
    let mut info = demo::model_info(2, 8, false);
    info.label = "embedded".into();
    demo::conversation(&mut app, &info, 1, 6, 3);
    let cmds = ctrl(&mut app, 'k');
    assert!(matches!(cmds[..], [Command::ListModels]), "{cmds:?}");
    assert!(app.picker.open);
    app.update(Msg::Engine(EngineEvent::Models(catalog(cuda))));
    app.notice = None;
    (app, info)
}

fn load_cmd(cmds: &[Command]) -> LoadSpec {
    match cmds {
        [Command::Load(s)] => s.clone(),
        other => panic!("expected one Load, got {other:?}"),
    }
}

#[test]
fn picker_lists_marks_the_loaded_model_and_loads_the_selected_one() {
    let (mut app, _) = picker_app(false);
    assert_eq!(app.picker.sel, 0, "the loaded model is selected first");
    insta::assert_snapshot!("picker_80x24", screen(&app, 80, 24));

    // the picker has the keys: typing letters does not reach the chat input
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    assert_eq!(app.picker.sel, 2);
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    assert_eq!(spec.model.as_deref(), Some("Zyphra/BlackMamba-2.8B"));
    assert_eq!((spec.device.as_deref(), spec.dtype.as_deref()), (Some("cpu"), Some("f32")));
    assert_eq!(spec.revision, None);
    assert!(!app.picker.open);
    assert_eq!(app.switching.as_deref(), Some("Zyphra/BlackMamba-2.8B"));
    app.update(Msg::Engine(EngineEvent::LoadProgress {
        stage: "Zyphra/BlackMamba-2.8B: download pytorch_model.bin".into(),
        done: 1_500_000_000,
        total: 5_600_000_000,
    }));
    let s = screen(&app, 80, 24);
    assert!(s.contains("Loading the model") && s.contains("1.5 GB of 5.6 GB"), "{s}");
    // the old model stays on screen, but nothing can be sent to it while the new one loads
    assert_eq!(app.model.as_ref().unwrap().label, "embedded");
    assert!(demo::type_and_send(&mut app, "hello?").is_empty());
    assert!(app.notice.as_ref().unwrap().text.contains("is loading"));
    assert!(ctrl(&mut app, 'r').is_empty());
    // the engine is busy loading: no second picker meanwhile
    assert!(ctrl(&mut app, 'k').is_empty());
    assert!(!app.picker.open);

    // loaded: a new chat on the new model
    let mut info = demo::model_info(3, 8, false);
    info.label = "Zyphra/BlackMamba-2.8B".into();
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info))));
    assert!(app.switching.is_none() && app.loading.is_none());
    assert_eq!(app.model.as_ref().unwrap().label, "Zyphra/BlackMamba-2.8B");
    assert!(app.chat.messages.is_empty());
    assert_eq!(app.tele.len(), 0);
    assert!(app.stats.is_none() && app.sink.chat.is_none());
    assert_eq!(app.chat.input.text, "hello?", "the typed message is kept");
    let s = screen(&app, 80, 24);
    assert!(s.contains("Zyphra/BlackMamba-2.8B") && !s.contains("Loading the model"), "{s}");
    assert!(matches!(key(&mut app, KeyCode::Enter)[..], [Command::Chat { .. }]));
}

#[test]
fn a_failed_load_keeps_the_old_model_and_the_chat() {
    let (mut app, info) = picker_app(false);
    let before = app.chat.messages.clone();
    key(&mut app, KeyCode::End);
    key(&mut app, KeyCode::Up);
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    assert_eq!(spec.model.as_deref(), Some("random:tiny"));
    app.update(Msg::Engine(EngineEvent::LoadFailed(
        "--model nowhere: no such folder; still on embedded".into(),
    )));
    assert!(app.switching.is_none() && app.loading.is_none());
    assert_eq!(app.model.as_ref(), Some(&info));
    assert_eq!(app.chat.messages, before);
    let n = app.notice.clone().unwrap();
    assert!(n.error && n.text.contains("still on embedded"));
    // chat works again
    assert!(matches!(demo::type_and_send(&mut app, "still there?")[..], [Command::Chat { .. }]));
}

#[test]
fn typed_entries_revisions_and_runtimes() {
    let (mut app, _) = picker_app(true);
    // typing on a list row starts the typed entry; pasting adds to it
    for c in "Zyphra/BlackMamba-2.8B".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    app.update(Msg::Paste("@0123abc\n".into()));
    assert!(app.picker.on_other());
    assert_eq!(app.picker.other.text, "Zyphra/BlackMamba-2.8B@0123abc ");
    assert!(app.chat.input.text.is_empty(), "keys stay in the picker");
    assert_eq!(app.view, View::Chat);
    // Tab changes device and dtype (CUDA build): cpu f32 → cpu bf16 → … → cuda bf16
    for _ in 0..3 {
        key(&mut app, KeyCode::Tab);
    }
    assert_eq!((app.picker.device.as_str(), app.picker.dtype.as_str()), ("cuda", "bf16"));
    assert_eq!(app.view, View::Chat, "Tab does not switch views under the picker");
    let s = screen(&app, 100, 30);
    assert!(
        s.contains("other: Zyphra/BlackMamba-2.8B@0123abc") && s.contains("‹ cuda bf16 ›"),
        "{s}"
    );
    insta::assert_snapshot!("picker_typed_100x30", s);
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    assert_eq!(spec.model.as_deref(), Some("Zyphra/BlackMamba-2.8B"));
    assert_eq!(spec.revision.as_deref(), Some("0123abc"));
    assert_eq!((spec.device.as_deref(), spec.dtype.as_deref()), (Some("cuda"), Some("bf16")));
    assert_eq!(app.switching.as_deref(), Some("Zyphra/BlackMamba-2.8B@0123abc"));

    // without CUDA the cycle stays on the CPU
    let (mut app, _) = picker_app(false);
    let mut seen = vec![];
    for _ in 0..4 {
        key(&mut app, KeyCode::Right);
        seen.push(format!("{} {}", app.picker.device, app.picker.dtype));
    }
    assert_eq!(seen, ["cpu bf16", "cpu f16", "cpu f32", "cpu bf16"]);
}

#[test]
fn refusals() {
    let (mut app, _) = picker_app(false);
    // unreachable offline: no command, the reason in red, the picker stays open
    key(&mut app, KeyCode::Down);
    assert!(key(&mut app, KeyCode::Enter).is_empty());
    let n = app.notice.clone().unwrap();
    assert!(n.error && n.text.contains("HF_HUB_OFFLINE"), "{n:?}");
    assert!(app.picker.open);
    // the loaded model on the same device and dtype: nothing to do
    key(&mut app, KeyCode::Home);
    assert!(key(&mut app, KeyCode::Enter).is_empty());
    assert!(app.notice.as_ref().unwrap().text.contains("already loaded"));
    assert!(!app.picker.open);
    // ... but on another dtype it reloads
    ctrl(&mut app, 'k');
    app.update(Msg::Engine(EngineEvent::Models(catalog(false))));
    key(&mut app, KeyCode::Right);
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    assert_eq!((spec.model, spec.dtype.as_deref()), (None, Some("bf16")));
    app.update(Msg::Engine(EngineEvent::LoadFailed("x".into())));
    // an empty typed entry
    ctrl(&mut app, 'k');
    key(&mut app, KeyCode::End);
    assert!(app.picker.on_other());
    assert!(key(&mut app, KeyCode::Enter).is_empty());
    assert!(app.notice.as_ref().unwrap().text.contains("type a model folder"));
    // Esc and Ctrl-K close it; nothing is sent
    assert!(key(&mut app, KeyCode::Esc).is_empty());
    assert!(!app.picker.open);
    ctrl(&mut app, 'k');
    assert!(ctrl(&mut app, 'k').is_empty());
    assert!(!app.picker.open);
    // while generating, choosing is refused (Esc stops the generation first)
    demo::type_and_send(&mut app, "go on");
    assert!(app.busy.is_some());
    ctrl(&mut app, 'k');
    app.update(Msg::Engine(EngineEvent::Models(catalog(false))));
    key(&mut app, KeyCode::End);
    key(&mut app, KeyCode::Up);
    assert!(key(&mut app, KeyCode::Enter).is_empty());
    assert!(app.notice.as_ref().unwrap().text.contains("still generating"));
    assert!(app.switching.is_none());
}

#[test]
fn the_picker_before_the_list_comes_and_at_every_size() {
    let mut app = App::new(Theme::default_theme());
    // not while the first model loads
    assert!(ctrl(&mut app, 'k').is_empty());
    assert!(!app.picker.open);
    assert!(app.notice.as_ref().unwrap().text.contains("still loading"));
    let info = demo::model_info(2, 8, true);
    demo::conversation(&mut app, &info, 1, 4, 1);
    ctrl(&mut app, 'k');
    let s = screen(&app, 80, 24);
    assert!(s.contains("asking the engine for the list") && s.contains("other: "), "{s}");
    assert!(s.contains("Tab device, dtype"), "the legend shows the picker's keys:\n{s}");
    for (w, h) in [(1, 1), (5, 3), (19, 5), (20, 6), (24, 8), (40, 12), (80, 24), (200, 60)] {
        screen(&app, w, h);
    }
    app.update(Msg::Engine(EngineEvent::Models(catalog(true))));
    for (w, h) in [(1, 1), (5, 3), (19, 5), (20, 6), (24, 8), (40, 12), (80, 24), (200, 60)] {
        screen(&app, w, h);
    }
    // a long list keeps the selection in view
    let mut many = catalog(false);
    for i in 0..40 {
        many.choices.push(choice(
            &format!("someone/model-{i:02}"),
            Some("someone/m"),
            None,
            Availability::Ready,
        ));
    }
    app.update(Msg::Engine(EngineEvent::Models(many)));
    key(&mut app, KeyCode::End);
    key(&mut app, KeyCode::Up);
    let s = screen(&app, 80, 24);
    assert!(s.contains("someone/model-39") && !s.contains("Zyphra/BlackMamba-1.5B"), "{s}");
    key(&mut app, KeyCode::Down);
    let s = screen(&app, 80, 24);
    assert!(s.contains("someone/model-39") && s.contains("other: "), "{s}");
    key(&mut app, KeyCode::PageUp);
    let s = screen(&app, 80, 24);
    assert!(s.contains("Zyphra/BlackMamba-1.5B") && !s.contains("someone/model-39"), "{s}");
}

#[test]
fn the_weight_format_goes_with_the_load_and_shows_in_the_status_bar() {
    let (mut app, _) = picker_app(false);
    assert_eq!(app.picker.format, None, "a dense model: as loaded");
    assert!(screen(&app, 100, 30).contains("weights ‹ as loaded ›"));
    // Ctrl-F: as loaded → int8 → fp8 → q4 (q4g64) → q4g128 → as loaded
    let mut seen = vec![];
    for _ in 0..5 {
        ctrl(&mut app, 'f');
        seen.push(app.picker.format_name());
    }
    assert_eq!(seen, ["int8", "fp8", "q4g64", "q4g128", "as loaded"]);
    ctrl(&mut app, 'f');
    assert!(screen(&app, 100, 30).contains("weights ‹ int8 ›"));
    // the loaded model again, now in int8: a load, not "already loaded"
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    let q = spec.quant.expect("a format");
    assert_eq!(q.format, QuantFormat::Int8);
    assert_eq!(q.parts, blackmamba::quant::Part::DEFAULT.to_vec());
    let mut info = demo::model_info(2, 8, false);
    info.label = "embedded [int8]".into();
    info.quant = Some("int8".into());
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info))));
    app.notice = None;
    let s = screen(&app, 100, 30);
    assert!(s.contains("cpu f32 int8 weights"), "{s}");
    // opening again starts from the loaded model's format; as loaded goes back to dense
    ctrl(&mut app, 'k');
    assert_eq!(app.picker.format, Some(QuantFormat::Int8));
    app.update(Msg::Engine(EngineEvent::Models(catalog(false))));
    for _ in 0..4 {
        ctrl(&mut app, 'f');
    }
    assert_eq!(app.picker.format, None);
    let spec = load_cmd(&key(&mut app, KeyCode::Enter));
    assert_eq!(spec.quant, None);
}

#[test]
fn the_compare_view_picks_model_b_with_the_picker() {
    let mut app = App::new(Theme::default_theme());
    let mut info = demo::model_info(2, 8, false);
    info.label = "embedded".into();
    demo::conversation(&mut app, &info, 1, 6, 3);
    key(&mut app, KeyCode::F(6));
    assert_eq!(app.view, View::Compare);
    let cmds = key(&mut app, KeyCode::Char('m'));
    assert!(matches!(cmds[..], [Command::ListModels]), "{cmds:?}");
    assert_eq!(app.picker.target, PickTarget::Compare);
    app.update(Msg::Engine(EngineEvent::Models(catalog(false))));
    assert!(screen(&app, 100, 30).contains("Compare with"));
    for c in "tests/fixtures/olmoe-tiny".chars() {
        key(&mut app, KeyCode::Char(c));
    }
    let cmds = key(&mut app, KeyCode::Enter);
    let [Command::Compare {
        text,
        with: CompareWith::Model(spec),
    }] = &cmds[..]
    else {
        panic!("one comparison: {cmds:?}")
    };
    assert_eq!(spec.model.as_deref(), Some("tests/fixtures/olmoe-tiny"));
    // the chat's text: every message
    assert!(!text.is_empty() && app.chat.messages.iter().all(|m| text.contains(&m.text())));
    assert!(!app.picker.open && app.switching.is_none(), "comparing loads nothing in place");
    assert!(app.cmp.pending.is_some());
    // Ctrl-K later is the ordinary picker again
    app.update(Msg::Engine(EngineEvent::Error {
        id: None,
        message: "x".into(),
    }));
    assert!(app.cmp.pending.is_none());
    ctrl(&mut app, 'k');
    assert_eq!(app.picker.target, PickTarget::Load);
}
