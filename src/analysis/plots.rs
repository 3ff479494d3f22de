//! PNG figures of the routing analysis, drawn with plotters' bitmap backend and the bundled
//! DejaVu Sans (no system font libraries), encoded with `png` and written atomically. Experts get
//! Paul Tol's colour-blind-safe "muted" palette (9 colours, enough for the at most 9 experts of a
//! SwitchMLP); depth gets viridis (sequential, colour-blind safe). Every function takes plain data,
//! so the TUI can export its current view with the same code.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::sinkhorn::SinkhornIter;

use super::collect::RouteTable;
use super::markdown::show_token;
use super::metrics::Balance;
use super::report::LayerDrift;

/// DejaVu Sans (Bitstream Vera licence, see assets/NOTICE).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// A good size for a figure in a report.
pub const DEFAULT_SIZE: (u32, u32) = (1200, 640);

/// Paul Tol's "muted" qualitative palette.
pub const EXPERT_COLORS: [RGBColor; 9] = [
    RGBColor(0xCC, 0x66, 0x77),
    RGBColor(0x33, 0x22, 0x88),
    RGBColor(0xDD, 0xCC, 0x77),
    RGBColor(0x11, 0x77, 0x33),
    RGBColor(0x88, 0xCC, 0xEE),
    RGBColor(0x88, 0x22, 0x55),
    RGBColor(0x44, 0xAA, 0x99),
    RGBColor(0x99, 0x99, 0x33),
    RGBColor(0xAA, 0x44, 0x99),
];

/// Colour of expert `e` (grey past the palette).
pub fn expert_color(e: usize) -> RGBColor {
    EXPERT_COLORS.get(e).copied().unwrap_or(RGBColor(0xBB, 0xBB, 0xBB))
}

/// Viridis at `x` in [0, 1] (five anchors, linear in between).
pub fn depth_color(x: f64) -> RGBColor {
    const V: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = if x.is_finite() { x.clamp(0.0, 1.0) } else { 0.0 } * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(mix(V[i].0, V[i + 1].0), mix(V[i].1, V[i + 1].1), mix(V[i].2, V[i + 1].2))
}

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
pub(crate) type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid("plots: the bundled font could not be read".into()))
    }
}

/// Draws onto a white RGB canvas of `size` and returns it as PNG bytes.
pub fn render_png(size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<Vec<u8>> {
    let (w, h) = size;
    if !(200..=8000).contains(&w) || !(150..=8000).contains(&h) {
        return Err(Error::Invalid(format!(
            "plot size {w}x{h}: use a width of 200-8000 and a height of 150-8000 pixels"
        )));
    }
    register_font()?;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        let r: DrawResult = (|| {
            root.fill(&WHITE)?;
            draw(&root)?;
            root.present()?;
            Ok(())
        })();
        r.map_err(|e| Error::Invalid(format!("drawing a plot failed: {e}")))?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
        wr.write_image_data(&buf)
            .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
        wr.finish().map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
    }
    Ok(out)
}

pub(crate) fn write_png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<()> {
    let bytes = render_png(size, draw)?;
    crate::model::weights::write_atomic(path, &bytes)
}

/// `Exact(v)`, or the closing `Last` past the final value `last`.
fn seg(v: u32, last: u32) -> SegmentValue<u32> {
    if v > last {
        SegmentValue::Last
    } else {
        SegmentValue::Exact(v)
    }
}

fn seg_index(v: &SegmentValue<u32>) -> Option<usize> {
    match v {
        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => Some(*i as usize),
        SegmentValue::Last => None,
    }
}

/// A legend of expert colours in its own area.
fn expert_legend(area: &Area<'_>, n: usize) -> DrawResult {
    area.draw(&Text::new("expert", (8, 40), ("sans-serif", 16)))?;
    for e in 0..n {
        let y = 66 + 26 * e as i32;
        area.draw(&Rectangle::new([(10, y), (30, y + 18)], expert_color(e).filled()))?;
        area.draw(&Text::new(format!("e{e}"), (38, y + 1), ("sans-serif", 16)))?;
    }
    Ok(())
}

/// Tokens × MoE layers, each cell coloured by the expert that layer chose for the token, over
/// tokens `start..start+len` of `rt`. With `labels` (one per token of `rt`) and at most 64 tokens
/// the token texts label the columns.
pub fn route_heatmap(rt: &RouteTable, start: usize, len: usize, labels: Option<&[String]>, size: (u32, u32), path: &Path) -> Result<()> {
    let n = rt.n_tokens();
    let nl = rt.layers.len();
    if nl == 0 || start >= n || len == 0 {
        return Err(Error::Invalid(format!(
            "route heatmap: nothing to draw ({n} tokens, {nl} MoE layers, from token {start}, {len} tokens)"
        )));
    }
    let end = (start + len).min(n);
    let labels = labels.filter(|l| l.len() == n && end - start <= 64);
    let e_max = rt.n_experts.iter().copied().max().unwrap_or(0);
    write_png(path, size, |root| {
        let (main, legend) = root.split_horizontally(size.0 as i32 - 100);
        let (last_t, last_l) = ((end - 1) as u32, (nl - 1) as u32);
        let mut chart = ChartBuilder::on(&main)
            .caption(
                format!("Expert chosen per token and MoE layer (tokens {start}..{end})"),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(if labels.is_some() { 110 } else { 45 })
            .y_label_area_size(70)
            .build_cartesian_2d((start as u32..last_t).into_segmented(), (0u32..last_l).into_segmented())?;
        let x_fmt = |v: &SegmentValue<u32>| match (seg_index(v), labels) {
            (Some(i), None) => i.to_string(),
            _ => String::new(),
        };
        let y_fmt = |v: &SegmentValue<u32>| {
            seg_index(v)
                .and_then(|m| rt.layers.get(m))
                .map_or(String::new(), ToString::to_string)
        };
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .x_desc(if labels.is_some() { "" } else { "token position" })
            .y_desc("half-block (MoE)")
            .y_labels(nl)
            .x_labels(if labels.is_some() { 1 } else { 12 })
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16));
        mesh.draw()?;
        chart.draw_series((start..end).flat_map(|t| {
            (0..nl).map(move |m| {
                let e = rt.routes[m].get(t).copied().unwrap_or(u8::MAX);
                let (t, m) = (t as u32, m as u32);
                Rectangle::new(
                    [(seg(t, last_t), seg(m, last_l)), (seg(t + 1, last_t), seg(m + 1, last_l))],
                    expert_color(usize::from(e)).filled(),
                )
            })
        }))?;
        if let Some(l) = labels {
            // Token texts read downwards from just under the axis, one per column.
            let style = TextStyle::from(("sans-serif", 13).into_font())
                .transform(FontTransform::Rotate90)
                .pos(Pos::new(HPos::Left, VPos::Center));
            for (t, text) in l.iter().enumerate().take(end).skip(start) {
                let (x, y) = chart.backend_coord(&(SegmentValue::CenterOf(t as u32), SegmentValue::Exact(0)));
                root.draw(&Text::new(show_token(text), (x, y + 6), style.clone()))?;
            }
        }
        expert_legend(&legend, e_max)
    })
}

/// Stacked bars: per MoE layer the share of tokens each expert took.
pub fn load_bars(layers: &[usize], balances: &[Balance], size: (u32, u32), path: &Path) -> Result<()> {
    check_layers("load bars", layers.len(), balances.len())?;
    let e_max = balances.iter().map(|b| b.loads.len()).max().unwrap_or(0);
    let last = (layers.len() - 1) as u32;
    write_png(path, size, |root| {
        let (main, legend) = root.split_horizontally(size.0 as i32 - 100);
        let mut chart = ChartBuilder::on(&main)
            .caption("Expert load by MoE layer (grey lines: an even split)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..last).into_segmented(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(layers.len())
            .x_label_formatter(&|v| seg_index(v).and_then(|m| layers.get(m)).map_or(String::new(), ToString::to_string))
            .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
            .x_desc("half-block (MoE)")
            .y_desc("share of tokens")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        for (m, b) in balances.iter().enumerate() {
            let mut y = 0.0;
            let m = m as u32;
            for (e, &c) in b.loads.iter().enumerate() {
                let h = if b.tokens > 0 { c as f64 / b.tokens as f64 } else { 0.0 };
                let mut r = Rectangle::new([(seg(m, last), y), (seg(m + 1, last), y + h)], expert_color(e).filled());
                r.set_margin(0, 0, 6, 6);
                chart.draw_series(std::iter::once(r))?;
                y += h;
            }
        }
        if e_max > 0 {
            let even = 1.0 / e_max as f64;
            let line = (1..e_max).map(|k| {
                PathElement::new(
                    vec![(SegmentValue::Exact(0), even * k as f64), (SegmentValue::Last, even * k as f64)],
                    BLACK.mix(0.25),
                )
            });
            chart.draw_series(line)?;
        }
        expert_legend(&legend, e_max)
    })
}

fn check_layers(what: &str, layers: usize, data: usize) -> Result<()> {
    if layers == 0 || layers != data {
        return Err(Error::Invalid(format!(
            "{what}: {layers} layer labels for {data} layers of data; give one label per layer"
        )));
    }
    Ok(())
}

/// Two panels by MoE depth: the CV of the loads, and the normalised entropy with the busiest
/// expert's share (dashed: 1/E, the share of a perfectly even layer).
pub fn balance_by_depth(layers: &[usize], balances: &[Balance], size: (u32, u32), path: &Path) -> Result<()> {
    check_layers("balance by depth", layers.len(), balances.len())?;
    let last = (layers.len() - 1) as u32;
    let cv_max = balances.iter().map(|b| b.cv).fold(0.0, f64::max).max(0.1) * 1.1;
    let e = balances.iter().map(|b| b.loads.len()).max().unwrap_or(1).max(1);
    write_png(path, size, |root| {
        let root = root.titled("Balance by depth", ("sans-serif", 22))?;
        let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
        let x_fmt = |v: &SegmentValue<u32>| seg_index(v).and_then(|m| layers.get(m)).map_or(String::new(), ToString::to_string);
        let center = |m: usize| SegmentValue::CenterOf(m as u32);
        let mut c1 = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..last).into_segmented(), 0f64..cv_max)?;
        c1.configure_mesh()
            .x_labels(layers.len())
            .x_label_formatter(&x_fmt)
            .y_desc("CV of loads")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        let blue = expert_color(1);
        c1.draw_series(LineSeries::new(
            balances.iter().enumerate().map(|(m, b)| (center(m), b.cv)),
            blue.stroke_width(2),
        ))?;
        c1.draw_series(
            balances
                .iter()
                .enumerate()
                .map(|(m, b)| Circle::new((center(m), b.cv), 4, blue.filled())),
        )?;
        let mut c2 = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..last).into_segmented(), 0f64..1.05f64)?;
        c2.configure_mesh()
            .x_labels(layers.len())
            .x_label_formatter(&x_fmt)
            .x_desc("half-block (MoE)")
            .y_desc("share")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        let (green, rose) = (expert_color(3), expert_color(0));
        c2.draw_series(LineSeries::new(
            balances.iter().enumerate().map(|(m, b)| (center(m), b.norm_entropy)),
            green.stroke_width(2),
        ))?
        .label("entropy / ln E")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2)));
        c2.draw_series(LineSeries::new(
            balances.iter().enumerate().map(|(m, b)| (center(m), b.busiest_share)),
            rose.stroke_width(2),
        ))?
        .label("busiest expert's share")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], rose.stroke_width(2)));
        let even = 1.0 / e as f64;
        c2.draw_series(DashedLineSeries::new(
            vec![(SegmentValue::Exact(0), even), (SegmentValue::Last, even)],
            6,
            4,
            BLACK.mix(0.5).stroke_width(1),
        ))?
        .label("1/E")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        c2.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    })
}

/// Convergence traces of one Sinkhorn variant: per layer, one trace.
#[derive(Debug, Clone)]
pub struct ConvergenceSeries {
    pub variant: String,
    pub tol: f64,
    /// (half-block index, trace)
    pub traces: Vec<(usize, Vec<SinkhornIter>)>,
}

/// A grid with one row per variant: left the stopping quantity mean|Δd1| against the tolerance,
/// right the worst row-marginal error (columns are exact after each pass's column step), both per iteration on a log scale, one line per layer
/// coloured by depth.
pub fn sinkhorn_convergence(series: &[ConvergenceSeries], size: (u32, u32), path: &Path) -> Result<()> {
    if series.is_empty() || series.iter().all(|s| s.traces.iter().all(|t| t.1.is_empty())) {
        return Err(Error::Invalid("Sinkhorn convergence: no traces to draw".into()));
    }
    const FLOOR: f64 = 1e-12;
    write_png(path, size, |root| {
        let root = root.titled("Sinkhorn convergence (first window of each layer)", ("sans-serif", 22))?;
        let cells = root.split_evenly((series.len(), 2));
        for (row, s) in series.iter().enumerate() {
            let n_iter = s.traces.iter().map(|t| t.1.len()).max().unwrap_or(1).max(1);
            let nl = s.traces.len().max(2) - 1;
            for col in 0..2 {
                let value = |it: &SinkhornIter| if col == 0 { it.abs_change } else { it.row_err };
                let vals = s
                    .traces
                    .iter()
                    .flat_map(|t| t.1.iter().map(value))
                    .chain((col == 0).then_some(s.tol));
                let (lo, hi) = vals.fold((f64::MAX, FLOOR), |(lo, hi), v| (lo.min(v.max(FLOOR)), hi.max(v)));
                let (lo, hi) = (lo.min(hi) / 3.0, hi * 3.0);
                let title = if col == 0 {
                    format!("{}: mean |Δd1| (stop ≤ {:e})", s.variant, s.tol)
                } else {
                    format!("{}: worst row error (× T)", s.variant)
                };
                let mut c = ChartBuilder::on(&cells[row * 2 + col])
                    .caption(title, ("sans-serif", 16))
                    .margin(10)
                    .x_label_area_size(35)
                    .y_label_area_size(65)
                    .build_cartesian_2d(0.5f64..n_iter as f64 + 0.5, (lo..hi).log_scale())?;
                c.configure_mesh()
                    .x_desc("iteration")
                    .x_labels(n_iter.min(10))
                    .y_labels(5)
                    .x_label_formatter(&|x| format!("{x:.0}"))
                    .y_label_formatter(&|y| format!("{y:.0e}"))
                    .label_style(("sans-serif", 12))
                    .axis_desc_style(("sans-serif", 13))
                    .draw()?;
                for (k, (layer, tr)) in s.traces.iter().enumerate() {
                    let color = depth_color(k as f64 / nl as f64);
                    let pts: Vec<(f64, f64)> = tr
                        .iter()
                        .enumerate()
                        .map(|(i, it)| ((i + 1) as f64, value(it).max(FLOOR)))
                        .collect();
                    let series = c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
                    if k == 0 || k + 1 == s.traces.len() {
                        series
                            .label(format!("layer {layer}"))
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                    }
                    c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                if col == 0 {
                    c.draw_series(DashedLineSeries::new(
                        vec![(0.5, s.tol), (n_iter as f64 + 0.5, s.tol)],
                        6,
                        4,
                        BLACK.mix(0.6).stroke_width(1),
                    ))?;
                }
                c.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 12))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()?;
            }
        }
        Ok(())
    })
}

/// Bars: per MoE layer the share of tokens whose expert changed between two models; black ticks:
/// the share two independent routings with the same loads would change.
pub fn drift_by_layer(drift: &[LayerDrift], other: &str, size: (u32, u32), path: &Path) -> Result<()> {
    check_layers("drift by layer", drift.len(), drift.len())?;
    let last = (drift.len() - 1) as u32;
    let top = drift.iter().map(|d| d.share.max(d.chance)).fold(0.0, f64::max).max(0.05) * 1.15;
    let top = top.min(1.0);
    write_png(path, size, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(format!("Routing drift against {other}"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..last).into_segmented(), 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(drift.len())
            .x_label_formatter(&|v| {
                seg_index(v)
                    .and_then(|m| drift.get(m))
                    .map_or(String::new(), |d| d.layer.to_string())
            })
            .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
            .x_desc("half-block (MoE)")
            .y_desc("tokens whose expert changed")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        let bar = expert_color(1);
        chart
            .draw_series(drift.iter().enumerate().map(|(m, d)| {
                let m = m as u32;
                let mut r = Rectangle::new([(seg(m, last), 0.0), (seg(m + 1, last), d.share)], bar.filled());
                r.set_margin(0, 0, 8, 8);
                r
            }))?
            .label("changed")
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], bar.filled()));
        chart
            .draw_series(drift.iter().enumerate().map(|(m, d)| {
                let m = m as u32;
                let mut r = Rectangle::new([(seg(m, last), d.chance), (seg(m + 1, last), d.chance)], BLACK.stroke_width(3));
                r.set_margin(0, 0, 4, 4);
                r
            }))?
            .label("chance (independent routing)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(3)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    })
}
