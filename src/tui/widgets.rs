//! Small drawing helpers shared by the views: themed blocks, bars, heatmap cells, log-scale line
//! charts and key/value rows. All of them only write into the buffer area they are given.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, BorderType, Borders, Chart, Dataset, GraphType, Paragraph, Widget};

use crate::tui::app::App;
use crate::tui::text::{clip, fit};
use crate::tui::theme::Role;

/// A bordered block titled with the view's (or panel's) name.
pub fn block<'a>(app: &App, title: &'a str, focused: bool) -> Block<'a> {
    let t = &app.theme;
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(t.style(if focused { Role::BorderFocus } else { Role::Border }))
        .title(Span::styled(format!(" {title} "), t.style(Role::Title)))
}

/// Draws a block and returns its inner area.
pub fn framed(app: &App, title: &str, focused: bool, area: Rect, buf: &mut Buffer) -> Rect {
    let b = block(app, title, focused);
    let inner = b.inner(area);
    b.render(area, buf);
    inner
}

/// A horizontal bar of `w` cells for `v / max` with eighth-cell resolution.
pub fn bar(v: f64, max: f64, w: usize) -> String {
    const PARTS: [char; 8] = ['▏', '▎', '▍', '▌', '▋', '▊', '▉', '█'];
    if w == 0 {
        return String::new();
    }
    let frac = if max > 0.0 && v.is_finite() {
        (v / max).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let eighths = (frac * w as f64 * 8.0).round() as usize;
    let mut s: String = std::iter::repeat_n('█', eighths / 8).collect();
    if eighths % 8 > 0 {
        s.push(PARTS[eighths % 8 - 1]);
    }
    fit(&s, w)
}

/// Writes `text` at (x, y) clipped to the area's right edge.
pub fn put(buf: &mut Buffer, area: Rect, x: u16, y: u16, text: &str, style: Style) {
    if y < area.y || y >= area.bottom() || x >= area.right() || x < area.x {
        return;
    }
    let w = usize::from(area.right() - x);
    buf.set_stringn(x, y, clip(text, w), w, style);
}

/// Renders lines into an area (clipped).
pub fn lines(area: Rect, buf: &mut Buffer, lines: Vec<Line<'_>>) {
    Paragraph::new(lines).render(area, buf);
}

/// A key and its value in two styles.
pub fn kv<'a>(app: &App, key: &'a str, value: String) -> Line<'a> {
    Line::from(vec![
        Span::styled(key, app.theme.style(Role::Muted)),
        Span::raw(" "),
        Span::styled(value, app.theme.style(Role::Text)),
    ])
}

/// One line series of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
}

/// A line chart; with `log_y` the values are drawn as log10 (non-positive values are dropped) and
/// the y labels read 1e-k.
pub fn line_chart(app: &App, title: &str, x_label: &str, series: &[Series<'_>], log_y: bool, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let tr = |y: f64| {
        if log_y {
            (y > 0.0 && y.is_finite()).then(|| y.log10())
        } else {
            y.is_finite().then_some(y)
        }
    };
    let data: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let pts: Vec<(f64, f64)> = s.points.iter().filter_map(|&(x, y)| tr(y).map(|y| (x, y))).collect();
            // braille gives 2 dots per cell: more than 4 points per column cannot be seen
            thin(&pts, 4 * usize::from(area.width).max(1))
        })
        .collect();
    let all = data.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let block = block(app, title, false);
    if !x0.is_finite() {
        let inner = block.inner(area);
        block.render(area, buf);
        put(buf, inner, inner.x, inner.y, "no data yet", t.style(Role::Muted));
        return;
    }
    if log_y {
        y0 = y0.floor();
        y1 = y1.ceil().max(y0 + 1.0);
    } else if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let ylab = |y: f64| {
        if log_y {
            format!("1e{}", y.round() as i64)
        } else {
            short(y)
        }
    };
    let datasets: Vec<Dataset<'_>> = series
        .iter()
        .zip(&data)
        .map(|(s, d)| {
            Dataset::default()
                .name(s.name.to_string())
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::new().fg(t.series(s.color)))
                .data(d)
        })
        .collect();
    let axis = t.style(Role::Axis);
    Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .title(Span::styled(x_label.to_string(), axis))
                .style(axis)
                .bounds([x0, x1])
                .labels([Span::raw(short(x0)), Span::raw(short(x1))]),
        )
        .y_axis(
            Axis::default()
                .style(axis)
                .bounds([y0, y1])
                .labels([Span::raw(ylab(y0)), Span::raw(ylab(y1))]),
        )
        .hidden_legend_constraints((ratatui::layout::Constraint::Ratio(1, 2), ratatui::layout::Constraint::Ratio(3, 4)))
        .render(area, buf);
}

/// At most about `max` points with the shape kept: per bucket of consecutive points, its lowest
/// and highest point in x order.
pub fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max);
    for chunk in points.chunks(per) {
        let (mut lo, mut hi) = (chunk[0], chunk[0]);
        for &p in chunk {
            if p.1 < lo.1 {
                lo = p;
            }
            if p.1 > hi.1 {
                hi = p;
            }
        }
        let (a, b) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        out.push(a);
        if b != a {
            out.push(b);
        }
    }
    out
}

/// A compact number: 3 significant digits, k/M suffixes.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_extremes_and_order() {
        let pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, ((i * 7919) % 1000) as f64)).collect();
        let out = thin(&pts, 400);
        assert!(out.len() <= 400, "{}", out.len());
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0), "x stays increasing");
        let max = |v: &[(f64, f64)]| v.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let min = |v: &[(f64, f64)]| v.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        assert_eq!((min(&out), max(&out)), (min(&pts), max(&pts)));
        assert_eq!(thin(&pts[..50], 400), pts[..50].to_vec());
    }

    #[test]
    fn bars_have_eighth_resolution() {
        assert_eq!(bar(1.0, 1.0, 4), "████");
        assert_eq!(bar(0.5, 1.0, 4), "██  ");
        assert_eq!(bar(1.0 / 16.0, 1.0, 4), "▎   ");
        assert_eq!(bar(f64::NAN, 1.0, 3), "   ");
    }
}
