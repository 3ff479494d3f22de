//! The text input of the chat, the prompts, the picker and the fine-tune form: a multi-line editor
//! with a cursor, and its editing keys as one table ([`EDIT_KEYS`]) that both handles them and
//! writes their help.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::tui::keymap::{find, Binding, Chord};

/// A multi-line text input with a cursor (byte offset into `text`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Editor {
    pub text: String,
    pub cursor: usize,
}

impl Editor {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_string(),
            cursor: text.len(),
        }
    }
    pub fn is_blank(&self) -> bool {
        self.text.trim().is_empty()
    }
    pub fn clear(&mut self) {
        self.text.clear();
        self.cursor = 0;
    }
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }
    /// Inserts text (pastes too); `\r\n` and `\r` become `\n`, other control characters are dropped.
    pub fn insert(&mut self, s: &str) {
        let clean: String = s
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .chars()
            .map(|c| if c == '\t' { ' ' } else { c })
            .filter(|&c| c == '\n' || !c.is_control())
            .collect();
        self.text.insert_str(self.cursor, &clean);
        self.cursor += clean.len();
    }
    pub fn backspace(&mut self) {
        if let Some(c) = self.text[..self.cursor].chars().next_back() {
            self.cursor -= c.len_utf8();
            self.text.remove(self.cursor);
        }
    }
    pub fn delete(&mut self) {
        if self.cursor < self.text.len() {
            self.text.remove(self.cursor);
        }
    }
    pub fn left(&mut self) {
        if let Some(c) = self.text[..self.cursor].chars().next_back() {
            self.cursor -= c.len_utf8();
        }
    }
    pub fn right(&mut self) {
        if let Some(c) = self.text[self.cursor..].chars().next() {
            self.cursor += c.len_utf8();
        }
    }
    pub fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }
    pub fn end(&mut self) {
        self.cursor = self.text[self.cursor..].find('\n').map_or(self.text.len(), |i| self.cursor + i);
    }
    /// Moves to the previous line; false when already on the first.
    pub fn up(&mut self) -> bool {
        let start = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
        if start == 0 {
            return false;
        }
        let col = self.text[start..self.cursor].chars().count();
        let prev_start = self.text[..start - 1].rfind('\n').map_or(0, |i| i + 1);
        self.cursor = advance(&self.text, prev_start, start - 1, col);
        true
    }
    /// Moves to the next line; false when already on the last.
    pub fn down(&mut self) -> bool {
        let Some(nl) = self.text[self.cursor..].find('\n').map(|i| self.cursor + i) else {
            return false;
        };
        let start = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[start..self.cursor].chars().count();
        let next_end = self.text[nl + 1..].find('\n').map_or(self.text.len(), |i| nl + 1 + i);
        self.cursor = advance(&self.text, nl + 1, next_end, col);
        true
    }
    pub fn lines(&self) -> usize {
        self.text.split('\n').count()
    }

    /// Start of the word before the cursor: back over non-word characters, then word characters.
    fn word_back(&self, is_word: fn(char) -> bool) -> usize {
        let mut at = self.cursor;
        let mut in_word = false;
        for (i, c) in self.text[..self.cursor].char_indices().rev() {
            if is_word(c) {
                in_word = true;
            } else if in_word {
                break;
            }
            at = i;
        }
        at
    }

    /// End of the word after the cursor: over non-word characters, then word characters.
    fn word_forward(&self, is_word: fn(char) -> bool) -> usize {
        let after = &self.text[self.cursor..];
        let mut seen_word = false;
        for (i, c) in after.char_indices() {
            if is_word(c) {
                seen_word = true;
            } else if seen_word {
                return self.cursor + i;
            }
        }
        self.text.len()
    }

    /// Alt-B, Ctrl-←: to the start of the previous word.
    pub fn word_left(&mut self) {
        self.cursor = self.word_back(is_word_char);
    }
    /// Alt-F, Ctrl-→: to the end of the next word.
    pub fn word_right(&mut self) {
        self.cursor = self.word_forward(is_word_char);
    }
    /// Ctrl-W: deletes back to the previous whitespace (as in a shell).
    pub fn delete_word_back(&mut self) {
        let from = self.word_back(|c| !c.is_whitespace());
        self.text.replace_range(from..self.cursor, "");
        self.cursor = from;
    }
    /// Alt-Backspace: deletes the word before the cursor (letters and digits).
    pub fn delete_alnum_back(&mut self) {
        let from = self.word_back(is_word_char);
        self.text.replace_range(from..self.cursor, "");
        self.cursor = from;
    }
    /// Alt-D: deletes to the end of the next word.
    pub fn delete_word_forward(&mut self) {
        let to = self.word_forward(is_word_char);
        self.text.replace_range(self.cursor..to, "");
    }
}

/// Letters, digits and `_` make words for Alt-B/F/D and Alt-Backspace.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

const fn ed(chords: &'static [Chord], help: &'static str, action: fn(&mut Editor)) -> Binding<fn(&mut Editor)> {
    Binding::new(chords, help, action)
}

/// The editing keys of every text input, in help order; typed characters are inserted.
pub const EDIT_KEYS: &[Binding<fn(&mut Editor)>] = &[
    ed(&[Chord::key(KeyCode::Left)], "character left", Editor::left),
    ed(&[Chord::key(KeyCode::Right)], "character right", Editor::right),
    ed(&[Chord::alt('b'), Chord::ctrl_key(KeyCode::Left)], "word left", Editor::word_left),
    ed(
        &[Chord::alt('f'), Chord::ctrl_key(KeyCode::Right)],
        "word right",
        Editor::word_right,
    ),
    ed(&[Chord::ctrl('a'), Chord::key(KeyCode::Home)], "start of the line", Editor::home),
    ed(&[Chord::ctrl('e'), Chord::key(KeyCode::End)], "end of the line", Editor::end),
    ed(&[Chord::key(KeyCode::Backspace)], "delete the character before", Editor::backspace),
    ed(
        &[Chord::key(KeyCode::Delete)],
        "delete the character under the cursor",
        Editor::delete,
    ),
    ed(&[Chord::ctrl('w')], "delete back to the previous space", Editor::delete_word_back),
    ed(
        &[Chord::alt_key(KeyCode::Backspace)],
        "delete the word before",
        Editor::delete_alnum_back,
    ),
    ed(&[Chord::alt('d')], "delete the word after", Editor::delete_word_forward),
];

/// Applies an editing key or types a character; false when the key is neither.
pub fn edit(e: &mut Editor, k: KeyEvent) -> bool {
    if let Some(b) = find(EDIT_KEYS, &k) {
        (b.action)(e);
        return true;
    }
    match k.code {
        KeyCode::Char(c) if !k.modifiers.intersects(KeyModifiers::CONTROL | KeyModifiers::ALT) => {
            e.insert(c.encode_utf8(&mut [0; 4]));
            true
        }
        _ => false,
    }
}

/// Byte offset `col` characters after `from`, but not past `end`.
fn advance(text: &str, from: usize, end: usize, col: usize) -> usize {
    text[from..end].char_indices().nth(col).map_or(end, |(i, _)| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_moves_between_lines_and_edits_utf8() {
        let mut e = Editor::new("héllo\nwörld!");
        assert!(e.up());
        assert_eq!(&e.text[e.cursor..], "\nwörld!");
        e.home();
        e.right();
        e.right();
        e.backspace();
        assert_eq!(e.text, "hllo\nwörld!");
        assert!(e.down());
        e.insert("X\r\nY\x1b");
        assert!(e.text.contains("X\nY"));
        assert!(!e.text.contains('\x1b'));
    }

    fn key(e: &mut Editor, code: KeyCode, m: KeyModifiers) {
        assert!(edit(e, KeyEvent::new(code, m)), "{code:?} {m:?} is an editing key");
    }

    #[test]
    fn word_keys_move_and_delete_by_words() {
        let mut e = Editor::new("héllo brave  new_world!");
        key(&mut e, KeyCode::Char('b'), KeyModifiers::ALT);
        assert_eq!(&e.text[e.cursor..], "new_world!");
        key(&mut e, KeyCode::Left, KeyModifiers::CONTROL);
        assert_eq!(&e.text[e.cursor..], "brave  new_world!");
        key(&mut e, KeyCode::Char('f'), KeyModifiers::ALT);
        assert_eq!(&e.text[e.cursor..], "  new_world!");
        key(&mut e, KeyCode::Char('d'), KeyModifiers::ALT);
        assert_eq!(e.text, "héllo brave!");
        key(&mut e, KeyCode::Char('w'), KeyModifiers::CONTROL);
        assert_eq!((e.text.as_str(), e.cursor), ("héllo !", "héllo ".len()));
        key(&mut e, KeyCode::Char('a'), KeyModifiers::CONTROL);
        key(&mut e, KeyCode::Char('X'), KeyModifiers::SHIFT);
        key(&mut e, KeyCode::Char('e'), KeyModifiers::CONTROL);
        assert_eq!((e.text.as_str(), e.cursor), ("Xhéllo !", "Xhéllo !".len()));
        key(&mut e, KeyCode::Left, KeyModifiers::NONE);
        key(&mut e, KeyCode::Backspace, KeyModifiers::ALT);
        assert_eq!((e.text.as_str(), e.cursor), ("!", 0));
        key(&mut e, KeyCode::Delete, KeyModifiers::NONE);
        assert_eq!((e.text.as_str(), e.cursor), ("", 0));
        // at the start nothing moves or breaks
        key(&mut e, KeyCode::Char('w'), KeyModifiers::CONTROL);
        key(&mut e, KeyCode::Char('b'), KeyModifiers::ALT);
        assert_eq!((e.text.as_str(), e.cursor), ("", 0));
        assert!(!edit(&mut e, KeyEvent::new(KeyCode::Char('r'), KeyModifiers::CONTROL)));
    }
}
