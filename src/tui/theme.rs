//! Themes: semantic roles → styles. Built-in themes (`themes/*.toml`) are embedded; a user file
//! (`--theme FILE`, or `~/.config/blackmamba/themes/NAME.toml` for a built-in NAME) sets any subset
//! of the keys over the theme it `extends` (default: dark). Views ask for roles, never colours.

use std::path::Path;
use std::str::FromStr;

use ratatui::style::{Color, Modifier, Style};

use crate::error::{Error, Result};

/// The built-in themes: (name, TOML).
pub const BUILTIN: &[(&str, &str)] = &[
    ("dark", include_str!("../../themes/dark.toml")),
    ("light", include_str!("../../themes/light.toml")),
    ("high-contrast", include_str!("../../themes/high-contrast.toml")),
];

/// What a piece of the screen is, whatever it looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Text,
    Muted,
    Accent,
    Border,
    BorderFocus,
    Title,
    Error,
    Warning,
    Success,
    Selection,
    TabActive,
    TabInactive,
    Status,
    Banner,
    Key,
    User,
    Assistant,
    System,
    Input,
    Cursor,
    Axis,
}

/// Every key a theme may set: (section, key, is a list).
const KEYS: &[(&str, &str, bool)] = &[
    ("base", "fg", false),
    ("base", "bg", false),
    ("base", "muted", false),
    ("base", "accent", false),
    ("base", "border", false),
    ("base", "border_focus", false),
    ("base", "title", false),
    ("base", "error", false),
    ("base", "warning", false),
    ("base", "success", false),
    ("base", "selection_fg", false),
    ("base", "selection_bg", false),
    ("base", "tab_active_fg", false),
    ("base", "tab_active_bg", false),
    ("base", "status_fg", false),
    ("base", "status_bg", false),
    ("base", "banner_fg", false),
    ("base", "banner_bg", false),
    ("base", "key", false),
    ("chat", "user", false),
    ("chat", "assistant", false),
    ("chat", "system", false),
    ("chat", "input", false),
    ("chat", "cursor_fg", false),
    ("chat", "cursor_bg", false),
    ("chart", "axis", false),
    ("chart", "series", true),
    ("heatmap", "ramp", true),
    ("heatmap", "empty", false),
    ("experts", "palette", true),
    ("experts", "text", false),
];

/// A resolved theme.
#[derive(Debug, Clone, PartialEq)]
pub struct Theme {
    pub name: String,
    table: toml::Table,
    /// Resolved colours, in the order of `KEYS` (lists: empty here, see `lists`); drawing looks
    /// colours up per cell, so they are parsed once.
    colors: Vec<Color>,
    lists: Vec<Vec<Color>>,
}

impl Theme {
    /// The default theme (dark).
    pub fn default_theme() -> Self {
        Self::builtin("dark").unwrap_or_else(|_| Self::from_table("dark", toml::Table::new()))
    }

    /// A built-in theme by name, with the user's overlay file for it if there is one.
    pub fn builtin(name: &str) -> Result<Self> {
        let text = BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).ok_or_else(|| {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!("unknown theme '{name}'; use one of {} or a .toml file", names.join(", ")))
        })?;
        let table = parse(text, &format!("themes/{name}.toml"))?;
        let mut base = if name == "dark" {
            toml::Table::new()
        } else {
            Self::builtin("dark")?.table
        };
        overlay(&mut base, table);
        Ok(Self::from_table(name, base))
    }

    /// `--theme NAME|FILE`: a built-in name (plus the user's overlay for it, `NAME.toml` in
    /// `user_dir`, the edge's `~/.config/blackmamba/themes`), or a TOML file.
    pub fn load(arg: &str, user_dir: Option<&Path>) -> Result<Self> {
        let path = Path::new(arg);
        if BUILTIN.iter().any(|(n, _)| *n == arg) && !path.is_file() {
            let mut theme = Self::builtin(arg)?;
            if let Some(user) = user_dir.map(|d| d.join(format!("{arg}.toml"))).filter(|p| p.is_file()) {
                theme.apply_file(&user)?;
            }
            return Ok(theme);
        }
        if !path.is_file() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(Error::Invalid(format!(
                "--theme {arg}: no such theme file, and not a built-in theme ({})",
                names.join(", ")
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_user_toml(&text, &path.display().to_string())
    }

    /// A user theme: its keys over the theme it extends (default dark).
    pub fn from_user_toml(text: &str, file: &str) -> Result<Self> {
        let table = parse(text, file)?;
        let base = match table.get("extends") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => return Err(located(text, file, "", "extends", "must be a theme name such as \"light\"")),
            None => "dark".into(),
        };
        let mut merged = Self::builtin(&base)
            .map_err(|e| located(text, file, "", "extends", &e.to_string()))?
            .table;
        let name = match table.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            _ => file.to_string(),
        };
        overlay(&mut merged, table);
        Ok(Self::from_table(&name, merged))
    }

    fn apply_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let table = parse(&text, &path.display().to_string())?;
        let mut merged = std::mem::take(&mut self.table);
        overlay(&mut merged, table);
        *self = Self::from_table(&self.name, merged);
        Ok(())
    }

    /// A theme from a merged table, with every colour parsed once.
    fn from_table(name: &str, table: toml::Table) -> Self {
        let value = |section: &str, key: &str| table.get(section).and_then(|s| s.get(key)).cloned();
        let parse = |v: &toml::Value| v.as_str().and_then(|s| Color::from_str(s).ok());
        let colors = KEYS
            .iter()
            .map(|&(s, k, _)| value(s, k).as_ref().and_then(parse).unwrap_or(Color::Reset))
            .collect();
        let lists = KEYS
            .iter()
            .map(|&(s, k, _)| {
                value(s, k)
                    .as_ref()
                    .and_then(toml::Value::as_array)
                    .map(|a| a.iter().filter_map(parse).collect())
                    .unwrap_or_default()
            })
            .collect();
        Self {
            name: name.to_string(),
            table,
            colors,
            lists,
        }
    }

    fn slot(section: &str, key: &str) -> Option<usize> {
        KEYS.iter().position(|&(s, k, _)| s == section && k == key)
    }

    fn color(&self, section: &str, key: &str) -> Color {
        Self::slot(section, key)
            .and_then(|i| self.colors.get(i))
            .copied()
            .unwrap_or(Color::Reset)
    }

    fn list(&self, section: &str, key: &str) -> &[Color] {
        Self::slot(section, key).and_then(|i| self.lists.get(i)).map_or(&[], Vec::as_slice)
    }

    /// The style of a role.
    pub fn style(&self, role: Role) -> Style {
        let fg = |k: &str| Style::new().fg(self.color("base", k));
        match role {
            Role::Text => fg("fg"),
            Role::Muted => fg("muted"),
            Role::Accent => fg("accent").add_modifier(Modifier::BOLD),
            Role::Border => fg("border"),
            Role::BorderFocus => fg("border_focus"),
            Role::Title => fg("title").add_modifier(Modifier::BOLD),
            Role::Error => fg("error").add_modifier(Modifier::BOLD),
            Role::Warning => fg("warning"),
            Role::Success => fg("success"),
            Role::Selection => fg("selection_fg").bg(self.color("base", "selection_bg")),
            Role::TabActive => fg("tab_active_fg")
                .bg(self.color("base", "tab_active_bg"))
                .add_modifier(Modifier::BOLD),
            Role::TabInactive => fg("muted"),
            Role::Status => fg("status_fg").bg(self.color("base", "status_bg")),
            Role::Banner => fg("banner_fg").bg(self.color("base", "banner_bg")).add_modifier(Modifier::BOLD),
            Role::Key => fg("key").add_modifier(Modifier::BOLD),
            Role::User => Style::new().fg(self.color("chat", "user")).add_modifier(Modifier::BOLD),
            Role::Assistant => Style::new().fg(self.color("chat", "assistant")),
            Role::System => Style::new().fg(self.color("chat", "system")),
            Role::Input => Style::new().fg(self.color("chat", "input")),
            Role::Cursor => Style::new().fg(self.color("chat", "cursor_fg")).bg(self.color("chat", "cursor_bg")),
            Role::Axis => Style::new().fg(self.color("chart", "axis")),
        }
    }

    /// The background of the whole screen.
    pub fn background(&self) -> Style {
        Style::new().fg(self.color("base", "fg")).bg(self.color("base", "bg"))
    }

    /// The colour of expert `e` (the palette repeats past its end; cells also show the id).
    pub fn expert_color(&self, e: usize) -> Color {
        let p = self.list("experts", "palette");
        if p.is_empty() {
            Color::Reset
        } else {
            p[e % p.len()]
        }
    }

    /// A heatmap cell of expert `e`: its colour as background, id in the `experts.text` colour.
    pub fn expert_cell(&self, e: usize) -> Style {
        Style::new().bg(self.expert_color(e)).fg(self.color("experts", "text"))
    }

    /// Text coloured by expert `e` (chat colouring).
    pub fn expert_text(&self, e: usize) -> Style {
        Style::new().fg(self.expert_color(e))
    }

    /// The ramp colour of `v` in [0, 1] (NaN: the empty colour).
    pub fn ramp(&self, v: f32) -> Color {
        let r = self.list("heatmap", "ramp");
        if !v.is_finite() || r.is_empty() {
            return self.color("heatmap", "empty");
        }
        let i = (v.clamp(0.0, 1.0) * (r.len() - 1) as f32).round() as usize;
        r[i.min(r.len() - 1)]
    }

    /// The empty heatmap colour.
    pub fn empty(&self) -> Color {
        self.color("heatmap", "empty")
    }

    /// The colour of chart series `i`.
    pub fn series(&self, i: usize) -> Color {
        let s = self.list("chart", "series");
        if s.is_empty() {
            Color::Reset
        } else {
            s[i % s.len()]
        }
    }
}

/// Parses and checks a theme file: known sections and keys, colour values.
fn parse(text: &str, file: &str) -> Result<toml::Table> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        Error::Invalid(format!("theme {file}:{line}: {}", e.message().trim()))
    })?;
    for (k, v) in &table {
        match (k.as_str(), v) {
            ("name" | "extends", toml::Value::String(_)) => {}
            ("name" | "extends", _) => return Err(located(text, file, "", k, "must be a string")),
            (section, toml::Value::Table(t)) if KEYS.iter().any(|(s, _, _)| *s == section) => {
                for (key, val) in t {
                    let Some(&(_, _, is_list)) = KEYS.iter().find(|(s, n, _)| *s == section && n == key) else {
                        return Err(located(text, file, section, key, "is not a theme key (see themes/dark.toml)"));
                    };
                    check_value(val, is_list).map_err(|p| located(text, file, section, key, &p))?;
                }
            }
            (other, _) => {
                return Err(located(
                    text,
                    file,
                    "",
                    other,
                    "is not a theme section; use [base], [chat], [chart], [heatmap] or [experts]",
                ))
            }
        }
    }
    Ok(table)
}

fn check_value(v: &toml::Value, is_list: bool) -> std::result::Result<(), String> {
    let color = |v: &toml::Value| match v.as_str() {
        Some(s) if Color::from_str(s).is_ok() => Ok(()),
        Some(s) => Err(format!("'{s}' is not a colour; use \"#rrggbb\", a colour name, 0-255 or \"reset\"")),
        None => Err("must be a colour string such as \"#88c0d0\"".to_string()),
    };
    if is_list {
        match v.as_array() {
            Some(a) if !a.is_empty() => a.iter().try_for_each(color),
            _ => Err("must be a non-empty list of colours".into()),
        }
    } else {
        color(v)
    }
}

/// Puts every key of `top` over `base`, section by section.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => b.extend(t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// An error naming file, line and key.
fn located(text: &str, file: &str, section: &str, key: &str, problem: &str) -> Error {
    let full = if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    };
    Error::Invalid(format!("theme {file}:{}: key '{full}' {problem}", key_line(text, section, key)))
}

fn line_of(text: &str, byte: usize) -> usize {
    text.get(..byte.min(text.len())).map_or(1, |t| t.matches('\n').count() + 1)
}

/// The line where `key` is set in `[section]` (top level when `section` is empty); 1 if not found.
fn key_line(text: &str, section: &str, key: &str) -> usize {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            current = s.trim().to_string();
            if section.is_empty() && current == key {
                return i + 1;
            }
            continue;
        }
        if current == section {
            if let Some(rest) = l.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return i + 1;
                }
            }
        }
    }
    1
}

/// Resolves `--theme` for the TUI (`user_dir`: see [`Theme::load`]): on any problem, the default
/// theme and a one-line warning.
pub fn resolve(arg: Option<&str>, user_dir: Option<&Path>) -> (Theme, Option<String>) {
    match Theme::load(arg.unwrap_or("dark"), user_dir) {
        Ok(t) => (t, None),
        Err(e) => (Theme::default_theme(), Some(format!("{e}; using the default theme"))),
    }
}
