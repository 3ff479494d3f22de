#![allow(clippy::unwrap_used)]
//! The App's keys and notices without a terminal: word-wise editing in the chat input, the system
//! prompt, errors that stay visible, panics of background threads shown as errors, and the key
//! tables that both dispatch keys and write the help (no binding hidden behind another, none
//! missing from the help).

use blackmamba::engine::protocol::{Command, ConversationInfo, EngineEvent};
use blackmamba::tui::app::{App, KeyAction, Msg, View};
use blackmamba::tui::keymap::{find, Binding};
use blackmamba::tui::theme::{self, Theme};
use blackmamba::tui::{demo, ui, update, views};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn key(app: &mut App, code: KeyCode, m: KeyModifiers) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(code, m)))
}

fn ctrl(app: &mut App, c: char) -> Vec<Command> {
    key(app, KeyCode::Char(c), KeyModifiers::CONTROL)
}

fn type_text(app: &mut App, text: &str) {
    for c in text.chars() {
        key(app, KeyCode::Char(c), KeyModifiers::NONE);
    }
}

fn ready_app() -> App {
    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(demo::model_info(2, 8, true)))));
    app.notice = None;
    app
}

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| ui::draw(app, f.area(), f.buffer_mut())).unwrap();
    format!("{}", term.backend())
}

#[test]
fn word_keys_edit_the_chat_message() {
    let mut app = ready_app();
    type_text(&mut app, "hello brave new world");
    ctrl(&mut app, 'w');
    assert_eq!(app.chat.input.text, "hello brave new ");
    key(&mut app, KeyCode::Char('b'), KeyModifiers::ALT);
    key(&mut app, KeyCode::Char('b'), KeyModifiers::ALT);
    type_text(&mut app, "very ");
    assert_eq!(app.chat.input.text, "hello very brave new ");
    key(&mut app, KeyCode::Char('f'), KeyModifiers::ALT);
    key(&mut app, KeyCode::Char('d'), KeyModifiers::ALT);
    assert_eq!(app.chat.input.text, "hello very brave ");
    ctrl(&mut app, 'a');
    type_text(&mut app, ">");
    ctrl(&mut app, 'e');
    type_text(&mut app, "!");
    assert_eq!(app.chat.input.text, ">hello very brave !");
    assert!(!app.chat.color_experts, "Ctrl-E moves to the end; it does not colour tokens");
    ctrl(&mut app, 't');
    assert!(app.chat.color_experts, "Ctrl-T colours tokens by expert");
}

#[test]
fn system_prompt_starts_a_chat_and_stays_for_new_ones() {
    let mut app = ready_app();
    assert!(ctrl(&mut app, 'g').is_empty());
    assert!(screen(&app, 80, 24).contains("System prompt"), "the field is shown");
    type_text(&mut app, "Answer briefly.");
    let cmds = key(&mut app, KeyCode::Enter, KeyModifiers::NONE);
    assert!(
        matches!(&cmds[..], [Command::NewChat { system: Some(s) }] if s == "Answer briefly."),
        "{cmds:?}"
    );
    // the engine's answer shows it as the chat's first message
    app.update(Msg::Engine(EngineEvent::Conversation(Box::new(ConversationInfo {
        system: Some("Answer briefly.".into()),
        turns: vec![],
        pos: 0,
    }))));
    let s = screen(&app, 80, 24);
    assert!(s.contains("System") && s.contains("Answer briefly."), "{s}");
    let cmds = ctrl(&mut app, 'n');
    assert!(
        matches!(&cmds[..], [Command::NewChat { system: Some(s) }] if s == "Answer briefly."),
        "Ctrl-N keeps it: {cmds:?}"
    );
    // Esc leaves the field without a new chat; an empty prompt clears it
    ctrl(&mut app, 'g');
    assert!(key(&mut app, KeyCode::Esc, KeyModifiers::NONE).is_empty());
    ctrl(&mut app, 'g');
    ctrl(&mut app, 'a');
    for _ in 0.."Answer briefly.".len() {
        key(&mut app, KeyCode::Delete, KeyModifiers::NONE);
    }
    let cmds = key(&mut app, KeyCode::Enter, KeyModifiers::NONE);
    assert!(matches!(&cmds[..], [Command::NewChat { system: None }]), "{cmds:?}");
}

#[test]
fn a_theme_error_outlives_the_loaded_note() {
    let (t, warning) = theme::resolve(Some("no-such-theme"), None);
    let warning = warning.unwrap();
    let mut app = App::new(t);
    app.notify(warning.clone(), true);
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(demo::model_info(2, 8, true)))));
    for _ in 0..30 {
        app.update(Msg::Tick);
    }
    let n = app.notice.clone().unwrap();
    assert!(
        n.error && n.text == warning,
        "three seconds on, the theme error is still shown: {n:?}"
    );
    assert!(screen(&app, 120, 24).contains("no-such-theme"));
    // after its time the waiting note comes up
    for _ in 0..150 {
        app.update(Msg::Tick);
    }
    let n = app.notice.clone().unwrap();
    assert!(!n.error && n.text.starts_with("loaded "), "{n:?}");
    // once a key was pressed, a new note replaces an error at once
    app.notify("bad", true);
    key(&mut app, KeyCode::Right, KeyModifiers::NONE);
    app.notify("fine", false);
    assert_eq!(app.notice.as_ref().map(|n| n.text.as_str()), Some("fine"));
}

#[test]
fn the_loaders_notes_are_shown_with_the_loaded_line() {
    let mut app = App::new(Theme::default_theme());
    let mut info = demo::model_info(2, 8, false);
    info.notes = vec!["read pytorch_model.bin directly: the conversion cache is read-only".into()];
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info))));
    let n = app.notice.clone().unwrap();
    assert!(
        n.text.starts_with("loaded ") && n.text.contains("note: read pytorch_model.bin directly"),
        "{n:?}"
    );
    assert!(screen(&app, 160, 24).contains("note: read pytorch_model.bin"));
}

#[test]
fn a_background_panic_is_an_error_and_the_app_goes_on() {
    let mut app = ready_app();
    app.update(Msg::Panicked {
        thread: "loader".into(),
        message: "index out of bounds (src/loader.rs:1)".into(),
    });
    let n = app.notice.clone().unwrap();
    assert!(n.error && n.text.contains("loader thread panicked") && n.text.contains("index out of bounds"));
    assert!(!app.quit);
    type_text(&mut app, "still here");
    assert_eq!(app.chat.input.text, "still here");
    ctrl(&mut app, 'q');
    assert!(app.quit, "Ctrl-Q still quits");
    // without input the UI cannot go on: it quits with the reason shown
    let mut app = ready_app();
    app.update(Msg::InputClosed("it panicked".into()));
    assert!(app.quit);
}

/// Every view table with the view it belongs to.
fn view_tables() -> Vec<(&'static str, View, &'static [Binding<KeyAction>])> {
    vec![
        ("chat", View::Chat, views::chat::INPUT_KEYS),
        ("sampling", View::Chat, views::chat::SAMPLING_KEYS),
        ("prompt", View::Chat, views::chat::PROMPT_KEYS),
        ("routing", View::Routing, views::routing::KEYS),
        ("sinkhorn", View::Sinkhorn, views::sinkhorn::KEYS),
        ("state", View::State, views::state::KEYS),
        ("finetune", View::Finetune, views::finetune::KEYS),
        ("finetune field", View::Finetune, views::finetune::FIELD_KEYS),
        ("compare", View::Compare, views::compare::KEYS),
        ("picker", View::Chat, views::picker::KEYS),
        ("picker list", View::Chat, views::picker::LIST_KEYS),
    ]
}

#[test]
fn no_key_is_hidden_and_the_help_lists_every_binding() {
    let help: Vec<(String, &str)> = ui::help_sections().into_iter().flat_map(|s| s.lines).collect();
    let listed = |keys: String, what: &str| help.iter().any(|(k, d)| *k == keys && *d == what);
    // keys that pass through to the view when they do not apply (busy, typing, editing a field)
    let conditional = [KeyCode::Esc, KeyCode::Char('?'), KeyCode::Tab, KeyCode::BackTab];
    for (name, _, table) in view_tables() {
        for b in table {
            assert!(
                listed(b.keys(), b.help),
                "{name}: '{}' ({}) is missing from the help",
                b.keys(),
                b.help
            );
            for c in b.chords {
                let ev = KeyEvent::new(c.code, c.mods);
                let first = find(table, &ev).map(|f| f.help);
                assert_eq!(first, Some(b.help), "{name}: {} is taken by an earlier binding", c.label());
                assert!(
                    find(update::ALWAYS_KEYS, &ev).is_none(),
                    "{name}: {} is a key of every view",
                    c.label()
                );
                if !conditional.contains(&c.code) && !name.starts_with("picker") {
                    assert!(find(update::GLOBAL_KEYS, &ev).is_none(), "{name}: {} is a global key", c.label());
                }
            }
        }
    }
    for b in update::ALWAYS_KEYS.iter().chain(update::GLOBAL_KEYS) {
        assert!(listed(b.keys(), b.help), "'{}' is missing from the help", b.keys());
    }
    for b in blackmamba::tui::editor::EDIT_KEYS {
        assert!(listed(b.keys(), b.help), "'{}' is missing from the help", b.keys());
    }
}

#[test]
fn the_legend_shows_keys_that_do_what_it_says() {
    let mut app = ready_app();
    for v in View::ALL {
        app.view = v;
        let legend = ui::legend_keys(&app);
        assert!(!legend.is_empty());
        for (k, word) in legend {
            let known = view_tables()
                .into_iter()
                .flat_map(|(_, _, t)| t.iter())
                .map(|b| (b.chords, b.legend))
                .chain(update::GLOBAL_KEYS.iter().map(|b| (b.chords, b.legend)))
                .any(|(chords, legend)| legend == Some(word) && chords.first().is_some_and(|c| k.starts_with(&c.label())));
            assert!(known, "{v:?}: legend '{k} {word}' has no binding");
        }
    }
}
