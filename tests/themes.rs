#![allow(clippy::unwrap_used)]
//! Built-in themes load and are complete; user files overlay them; bad files fail with file, line
//! and key, and the TUI falls back to the default theme.

use blackmamba::tui::theme::{resolve, Role, Theme, BUILTIN};
use ratatui::style::Color;

fn keys(text: &str) -> Vec<String> {
    let t: toml::Table = toml::from_str(text).unwrap();
    let mut out = vec![];
    for (s, v) in &t {
        if let toml::Value::Table(inner) = v {
            out.extend(inner.keys().map(|k| format!("{s}.{k}")));
        }
    }
    out.sort();
    out
}

#[test]
fn every_builtin_loads_and_sets_every_key() {
    let dark = keys(BUILTIN[0].1);
    assert!(dark.len() >= 30, "{dark:?}");
    for (name, text) in BUILTIN {
        assert_eq!(keys(text), dark, "{name} must set the same keys as dark");
        let t = Theme::load(name, None).unwrap();
        assert_eq!(t.name, *name);
        assert_ne!(t.style(Role::Accent).fg, None);
        assert_ne!(t.expert_color(0), t.expert_color(1));
    }
    assert!(["dark", "light", "high-contrast"]
        .iter()
        .all(|n| BUILTIN.iter().any(|(b, _)| b == n)));
}

#[test]
fn user_file_overrides_only_its_keys() {
    let t = Theme::load("tests/fixtures/themes/user_overlay.toml", None).unwrap();
    let light = Theme::load("light", None).unwrap();
    assert_eq!(t.name, "mine");
    assert_eq!(t.style(Role::Accent).fg, Some(Color::Rgb(255, 0, 0)));
    assert_eq!(t.style(Role::Text), light.style(Role::Text));
    assert_eq!(t.expert_color(0), Color::Red);
    assert_eq!(t.expert_color(3), Color::Blue, "the palette repeats");
}

#[test]
fn a_builtin_takes_the_users_overlay_from_the_theme_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dark.toml"), "[base]\naccent = \"#00ff00\"\n").unwrap();
    let dark = Theme::load("dark", None).unwrap();
    let t = Theme::load("dark", Some(dir.path())).unwrap();
    assert_eq!(t.style(Role::Accent).fg, Some(Color::Rgb(0, 255, 0)));
    assert_ne!(dark.style(Role::Accent).fg, Some(Color::Rgb(0, 255, 0)));
    assert_eq!(t.style(Role::Text), dark.style(Role::Text), "only the overlay's keys change");
    // a bad overlay is reported, naming its file
    std::fs::write(dir.path().join("light.toml"), "[base]\naccent = \"#12\"\n").unwrap();
    let e = Theme::load("light", Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains("light.toml"), "{e}");
}

fn err(path: &str) -> String {
    Theme::load(path, None).unwrap_err().to_string()
}

#[test]
fn bad_files_name_file_line_and_key() {
    let e = err("tests/fixtures/themes/invalid_unknown_key.toml");
    assert!(e.contains("invalid_unknown_key.toml:4") && e.contains("'base.acent'"), "{e}");
    let e = err("tests/fixtures/themes/invalid_colour.toml");
    assert!(
        e.contains("invalid_colour.toml:4") && e.contains("'chat.user'") && e.contains("#12345"),
        "{e}"
    );
    let e = err("tests/fixtures/themes/invalid_syntax.toml");
    assert!(e.contains("invalid_syntax.toml:3"), "{e}");
    let e = err("tests/fixtures/themes/invalid_palette.toml");
    assert!(e.contains("invalid_palette.toml:2") && e.contains("'experts.palette'"), "{e}");
    let e = err("no-such-theme");
    assert!(e.contains("no-such-theme") && e.contains("high-contrast"), "{e}");
}

#[test]
fn the_tui_falls_back_to_the_default_theme_with_a_message() {
    let (t, warning) = resolve(Some("tests/fixtures/themes/invalid_unknown_key.toml"), None);
    assert_eq!(t, Theme::default_theme());
    let w = warning.unwrap();
    assert!(
        w.contains("invalid_unknown_key.toml:4") && w.contains("using the default theme"),
        "{w}"
    );
    let (t, warning) = resolve(Some("high-contrast"), None);
    assert_eq!(t.name, "high-contrast");
    assert!(warning.is_none());
}

#[test]
fn theme_flag_works_with_and_without_the_chat_subcommand() {
    use blackmamba::commands::{Cli, Command};
    use clap::Parser;
    let cli = Cli::try_parse_from(["blackmamba", "--theme", "light"]).unwrap();
    assert!(cli.command.is_none());
    assert_eq!(cli.chat.theme.as_deref(), Some("light"));
    let cli = Cli::try_parse_from(["blackmamba", "chat", "--theme", "mine.toml", "--model", "random:tiny"]).unwrap();
    match cli.command {
        Some(Command::Chat(a)) => assert_eq!(a.or(cli.chat).theme.as_deref(), Some("mine.toml")),
        other => panic!("{other:?}"),
    }
    assert_eq!(cli.model.model.as_deref(), Some("random:tiny"));
    assert!(Cli::try_parse_from(["blackmamba", "generate", "--prompt", "x", "--theme", "light"]).is_err());
}
