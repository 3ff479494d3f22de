//! Text for the screen: sanitising (no control bytes reach the terminal), display widths, word
//! wrapping of styled segments.

use ratatui::style::Style;
use ratatui::text::{Line, Span};
use unicode_width::UnicodeWidthChar;

/// Replaces what must not reach the terminal: tabs become spaces, other control characters
/// (C0, DEL, C1, including ESC) become `·`. Newlines are kept (callers split on them).
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push('\n'),
            '\t' => out.push_str("    "),
            '\r' => {}
            c if c.is_control() => out.push('·'),
            // zero-width joiners etc. are fine; bidi overrides could reorder the screen
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => out.push('·'),
            c => out.push(c),
        }
    }
    out
}

/// One line of a token label: sanitised, newlines shown as `⏎`.
pub fn one_line(s: &str) -> String {
    sanitize(s).replace('\n', "⏎")
}

/// Display width of a character (0 for combining marks).
pub fn char_width(c: char) -> usize {
    c.width().unwrap_or(0)
}

/// Display width of a string.
pub fn width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// The longest prefix of `s` that fits `w` columns.
pub fn clip(s: &str, w: usize) -> String {
    let mut used = 0;
    let mut out = String::new();
    for c in s.chars() {
        let cw = char_width(c);
        if used + cw > w {
            break;
        }
        used += cw;
        out.push(c);
    }
    out
}

/// Pads or clips `s` to exactly `w` columns.
pub fn fit(s: &str, w: usize) -> String {
    let mut out = clip(s, w);
    let pad = w.saturating_sub(width(&out));
    out.extend(std::iter::repeat_n(' ', pad));
    out
}

/// Wraps styled segments (already sanitised; `\n` breaks lines) into lines of at most `w` columns,
/// breaking after spaces where possible. Every line starts with `indent`.
pub fn wrap(segments: &[(String, Style)], w: usize, indent: &str) -> Vec<Line<'static>> {
    let w = w.max(1);
    let indent_w = width(indent).min(w.saturating_sub(1));
    let mut lines = Vec::new();
    // current line: spans, width; and the last break opportunity (span index, byte, width)
    let mut cur: Vec<(String, Style)> = Vec::new();
    let mut cur_w = indent_w;
    let flush = |cur: &mut Vec<(String, Style)>, lines: &mut Vec<Line<'static>>| {
        let mut spans = vec![Span::raw(indent.to_string())];
        spans.extend(cur.drain(..).map(|(t, s)| Span::styled(t, s)));
        lines.push(Line::from(spans));
    };
    for (text, style) in segments {
        for c in text.chars() {
            if c == '\n' {
                flush(&mut cur, &mut lines);
                cur_w = indent_w;
                continue;
            }
            let cw = char_width(c);
            if cur_w + cw > w && cur_w > indent_w {
                if c == ' ' {
                    flush(&mut cur, &mut lines);
                    cur_w = indent_w;
                    continue;
                }
                // carry the last word over when there is a space to break at
                let carry = take_last_word(&mut cur);
                flush(&mut cur, &mut lines);
                cur_w = indent_w + carry.iter().map(|(t, _)| width(t)).sum::<usize>();
                cur = carry;
            }
            match cur.last_mut() {
                Some((t, s)) if s == style => t.push(c),
                _ => cur.push((c.to_string(), *style)),
            }
            cur_w += cw;
        }
    }
    if !cur.is_empty() || lines.is_empty() {
        flush(&mut cur, &mut lines);
    }
    lines
}

/// Removes and returns the trailing word (after the last space) of a line, if the line has a
/// space and the word is not the whole line.
fn take_last_word(cur: &mut Vec<(String, Style)>) -> Vec<(String, Style)> {
    for i in (0..cur.len()).rev() {
        if let Some(b) = cur[i].0.rfind(' ') {
            let first_span_whole = i == 0 && b == 0;
            if first_span_whole && cur.len() == 1 {
                return Vec::new();
            }
            let tail = cur[i].0.split_off(b + 1);
            let mut out = Vec::new();
            if !tail.is_empty() {
                out.push((tail, cur[i].1));
            }
            out.extend(cur.drain(i + 1..));
            if out.iter().map(|(t, _)| width(t)).sum::<usize>() > 40 {
                // a very long word: not worth carrying; put it back
                cur.extend(out);
                return Vec::new();
            }
            return out;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_escapes_and_controls() {
        assert_eq!(sanitize("a\x1b[31mb\tc\r\nd\u{7f}\u{9b}"), "a·[31mb    c\nd··");
    }

    #[test]
    fn wrap_breaks_at_spaces_and_respects_width() {
        let st = Style::new();
        let lines = wrap(&[("hello brave new world".into(), st)], 11, "");
        let text: Vec<String> = lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.to_string()).collect())
            .collect();
        assert_eq!(text, vec!["hello brave", "new world"]);
        for l in wrap(&[("x".repeat(50), st), ("日本語のテキスト".into(), st)], 7, "> ") {
            assert!(l.width() <= 7, "{l:?}");
        }
    }
}
