//! Key bindings as data. Each view's module holds a table of [`Binding`]s; the same table
//! dispatches its keys ([`find`]), writes its help section ([`section`]) and its legend line
//! ([`legend`]), so what the help says and what a key does cannot disagree.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// One key and the modifiers it needs. Ctrl and Alt must match; so must Shift, except on
/// characters and Shift-Tab, where terminals may or may not report it (`?`, `G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chord {
    pub code: KeyCode,
    pub mods: KeyModifiers,
}

impl Chord {
    /// A key without modifiers.
    pub const fn key(code: KeyCode) -> Self {
        Self {
            code,
            mods: KeyModifiers::NONE,
        }
    }
    /// A character key without modifiers.
    pub const fn ch(c: char) -> Self {
        Self::key(KeyCode::Char(c))
    }
    /// Ctrl + a character.
    pub const fn ctrl(c: char) -> Self {
        Self {
            code: KeyCode::Char(c),
            mods: KeyModifiers::CONTROL,
        }
    }
    /// Ctrl + a key.
    pub const fn ctrl_key(code: KeyCode) -> Self {
        Self {
            code,
            mods: KeyModifiers::CONTROL,
        }
    }
    /// Alt + a character.
    pub const fn alt(c: char) -> Self {
        Self {
            code: KeyCode::Char(c),
            mods: KeyModifiers::ALT,
        }
    }
    /// Alt + a key.
    pub const fn alt_key(code: KeyCode) -> Self {
        Self {
            code,
            mods: KeyModifiers::ALT,
        }
    }
    /// Shift + a key.
    pub const fn shift_key(code: KeyCode) -> Self {
        Self {
            code,
            mods: KeyModifiers::SHIFT,
        }
    }

    /// Whether the key event is this chord.
    pub fn matches(&self, k: &KeyEvent) -> bool {
        let loose_shift = matches!(self.code, KeyCode::Char(_) | KeyCode::BackTab) && !self.mods.contains(KeyModifiers::SHIFT);
        let strict = if loose_shift {
            KeyModifiers::CONTROL | KeyModifiers::ALT
        } else {
            KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT
        };
        k.code == self.code && (k.modifiers & strict) == (self.mods & strict)
    }

    /// How the help writes it: `Ctrl-R`, `Alt-Enter`, `↑`, `PgDn`, `k`.
    pub fn label(&self) -> String {
        let key = match self.code {
            KeyCode::Char(' ') => "Space".to_string(),
            KeyCode::Char(c) if self.mods.intersects(KeyModifiers::CONTROL | KeyModifiers::ALT) => c.to_uppercase().to_string(),
            KeyCode::Char(c) => c.to_string(),
            KeyCode::Up => "↑".into(),
            KeyCode::Down => "↓".into(),
            KeyCode::Left => "←".into(),
            KeyCode::Right => "→".into(),
            KeyCode::PageUp => "PgUp".into(),
            KeyCode::PageDown => "PgDn".into(),
            KeyCode::Home => "Home".into(),
            KeyCode::End => "End".into(),
            KeyCode::Enter => "Enter".into(),
            KeyCode::Esc => "Esc".into(),
            KeyCode::Tab => "Tab".into(),
            KeyCode::BackTab => "Shift-Tab".into(),
            KeyCode::Backspace => "Backspace".into(),
            KeyCode::Delete => "Del".into(),
            KeyCode::F(n) => format!("F{n}"),
            other => format!("{other:?}"),
        };
        let mut out = String::new();
        if self.mods.contains(KeyModifiers::CONTROL) {
            out.push_str("Ctrl-");
        }
        if self.mods.contains(KeyModifiers::ALT) {
            out.push_str("Alt-");
        }
        if self.mods.contains(KeyModifiers::SHIFT) {
            out.push_str("Shift-");
        }
        out + &key
    }
}

/// A key binding: the chords that trigger it, what it does (help, legend) and the action.
#[derive(Debug, Clone, Copy)]
pub struct Binding<A> {
    pub chords: &'static [Chord],
    /// The help screen's description.
    pub help: &'static str,
    /// The legend line's word; `None` for keys listed only in the help.
    pub legend: Option<&'static str>,
    pub action: A,
}

impl<A: Copy> Binding<A> {
    /// A binding shown in the help only.
    pub const fn new(chords: &'static [Chord], help: &'static str, action: A) -> Self {
        Self {
            chords,
            help,
            legend: None,
            action,
        }
    }
    /// The same binding, also in the legend line as `word`.
    pub const fn legend(self, word: &'static str) -> Self {
        Self {
            chords: self.chords,
            help: self.help,
            legend: Some(word),
            action: self.action,
        }
    }
}

impl<A> Binding<A> {
    /// The chords as the help writes them (`Ctrl-A Home`).
    pub fn keys(&self) -> String {
        self.chords.iter().map(Chord::label).collect::<Vec<_>>().join(" ")
    }
}

/// The first binding of `table` that `k` triggers.
pub fn find<'a, A>(table: &'a [Binding<A>], k: &KeyEvent) -> Option<&'a Binding<A>> {
    table.iter().find(|b| b.chords.iter().any(|c| c.matches(k)))
}

/// A help section: a title and (keys, description) lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub title: &'static str,
    pub lines: Vec<(String, &'static str)>,
}

/// The help section of `table`, plus `notes` (lines without keys).
pub fn section<A>(title: &'static str, table: &[Binding<A>], notes: &[(&str, &'static str)]) -> Section {
    let mut lines: Vec<(String, &'static str)> = table.iter().map(|b| (b.keys(), b.help)).collect();
    lines.extend(notes.iter().map(|&(k, d)| (k.to_string(), d)));
    Section { title, lines }
}

/// Key pairs the legend writes as one (`←→ layer`): (first, second, joiner).
const PAIRS: [(&str, &str, &str); 5] = [
    ("↑", "↓", ""),
    ("←", "→", ""),
    ("PgUp", "PgDn", "/"),
    ("Home", "End", "/"),
    ("+", "-", "/"),
];

/// The legend entries (first chord, word) of `table`, in its order. A binding right after one with
/// a legend word, that has none itself and whose key is the other half of a pair (↑↓, ←→, PgUp/PgDn,
/// Home/End, +/-), joins its key: `←→ layer`.
pub fn legend<A>(table: &[Binding<A>]) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for (i, b) in table.iter().enumerate() {
        let (Some(word), Some(first)) = (b.legend, b.chords.first()) else {
            continue;
        };
        let mut key = first.label();
        let next = table.get(i + 1).filter(|n| n.legend.is_none()).and_then(|n| n.chords.first());
        if let Some(n) = next {
            let n = n.label();
            if let Some((_, _, join)) = PAIRS.iter().find(|(a, b, _)| *a == key && *b == n) {
                key = format!("{key}{join}{n}");
            }
        }
        out.push((key, word));
    }
    out
}

/// Moves the selection `i` by `d` within `0..n` (clamped).
pub fn step_in(i: usize, d: isize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (i as isize + d).clamp(0, n as isize - 1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(code: KeyCode, mods: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, mods)
    }

    #[test]
    fn chords_match_their_modifiers_and_label_themselves() {
        let c = Chord::ctrl('w');
        assert!(c.matches(&ev(KeyCode::Char('w'), KeyModifiers::CONTROL)));
        assert!(!c.matches(&ev(KeyCode::Char('w'), KeyModifiers::NONE)));
        assert!(!c.matches(&ev(KeyCode::Char('w'), KeyModifiers::CONTROL | KeyModifiers::ALT)));
        assert!(Chord::ch('?').matches(&ev(KeyCode::Char('?'), KeyModifiers::SHIFT)));
        assert!(!Chord::shift_key(KeyCode::Enter).matches(&ev(KeyCode::Enter, KeyModifiers::NONE)));
        assert!(!Chord::key(KeyCode::Enter).matches(&ev(KeyCode::Enter, KeyModifiers::SHIFT)));
        assert!(Chord::key(KeyCode::BackTab).matches(&ev(KeyCode::BackTab, KeyModifiers::SHIFT)));
        assert_eq!(c.label(), "Ctrl-W");
        assert_eq!(Chord::alt_key(KeyCode::Enter).label(), "Alt-Enter");
        assert_eq!(Chord::ch(' ').label(), "Space");
    }

    #[test]
    fn the_first_matching_binding_wins_and_help_lists_every_chord() {
        const T: &[Binding<u8>] = &[
            Binding::new(&[Chord::shift_key(KeyCode::Enter), Chord::alt_key(KeyCode::Enter)], "newline", 1).legend("newline"),
            Binding::new(&[Chord::key(KeyCode::Enter)], "send", 2).legend("send"),
        ];
        assert_eq!(find(T, &ev(KeyCode::Enter, KeyModifiers::SHIFT)).map(|b| b.action), Some(1));
        assert_eq!(find(T, &ev(KeyCode::Enter, KeyModifiers::NONE)).map(|b| b.action), Some(2));
        assert!(find(T, &ev(KeyCode::Esc, KeyModifiers::NONE)).is_none());
        let s = section("Chat", T, &[("typing", "inserts")]);
        assert_eq!(s.lines[0], ("Shift-Enter Alt-Enter".to_string(), "newline"));
        assert_eq!(s.lines.len(), 3);
        assert_eq!(
            legend(T),
            vec![("Shift-Enter".to_string(), "newline"), ("Enter".to_string(), "send")]
        );
        const P: &[Binding<u8>] = &[
            Binding::new(&[Chord::key(KeyCode::Left)], "left", 1).legend("layer"),
            Binding::new(&[Chord::key(KeyCode::Right)], "right", 2),
            Binding::new(&[Chord::key(KeyCode::Home)], "first", 3).legend("first"),
            Binding::new(&[Chord::key(KeyCode::Up)], "up", 4),
        ];
        assert_eq!(legend(P), vec![("←→".to_string(), "layer"), ("Home".to_string(), "first")]);
    }
}
