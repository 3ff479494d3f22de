//! The figures of the cross-model study: measures against relative depth (one line per model,
//! dashed where it is the chance value), the co-activation matrix of a top-k layer, and the
//! layer-by-layer agreement of the two models over aligned tokens. Drawn with the bitmap backend
//! and written atomically, as the single-model figures are.

use std::path::Path;

use plotters::prelude::*;

use super::measures::{LayerStudy, ModelStudy};
use super::ModelRoutes;
use crate::analysis::plots::{depth_color, expert_color, write_png, Area, DrawResult};
use crate::error::{Error, Result};

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    /// (relative depth, value)
    pub points: Vec<(f64, f64)>,
}

/// One panel: a y axis and its lines.
#[derive(Debug, Clone)]
pub struct Panel {
    pub y_desc: String,
    pub series: Vec<Series>,
}

fn draw_panel(area: &Area<'_>, p: &Panel, x_desc: &str) -> DrawResult {
    let y_max = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(0.05)
        * 1.15;
    let mut c = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1f64, 0f64..y_max)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(p.y_desc.as_str())
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for s in &p.series {
        let color = s.color;
        let style = color.stroke_width(2);
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|q| q.1.is_finite()).collect();
        if s.dashed {
            c.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))?
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        } else {
            c.draw_series(LineSeries::new(pts.clone(), style))?
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            c.draw_series(pts.iter().map(|&q| Circle::new(q, 4, color.filled())))?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// Panels stacked vertically, each against relative depth.
pub fn depth_panels(title: &str, panels: &[Panel], size: (u32, u32), path: &Path) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::Invalid(format!("{title}: no panel to draw")));
    }
    write_png(path, size, |root| {
        let root = root.titled(title, ("sans-serif", 22))?;
        let areas = root.split_evenly((panels.len(), 1));
        for (i, (a, p)) in areas.iter().zip(panels).enumerate() {
            let x = if i + 1 == panels.len() {
                "relative depth ((layer + ½) / layers)"
            } else {
                ""
            };
            draw_panel(a, p, x)?;
        }
        Ok(())
    })
}

/// A matrix as coloured cells (viridis, 0 to the largest value), rows top to bottom.
pub fn matrix(title: &str, m: &[Vec<f64>], x_desc: &str, y_desc: &str, size: (u32, u32), path: &Path) -> Result<()> {
    let rows = m.len();
    let cols = m.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 {
        return Err(Error::Invalid(format!("{title}: an empty matrix")));
    }
    let max = m.iter().flatten().copied().filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12);
    write_png(path, size, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..cols as f64, rows as f64..0f64)?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols.min(16))
            .y_labels(rows.min(16))
            .x_label_formatter(&|v| format!("{}", v.floor() as i64))
            .y_label_formatter(&|v| format!("{}", v.floor() as i64))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()?;
        c.draw_series(m.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                let (x, y) = (j as f64, i as f64);
                Rectangle::new([(x, y), (x + 1.0, y + 1.0)], depth_color(v / max).filled())
            })
        }))?;
        Ok(())
    })
}

/// P(j chosen | i chosen) of MoE layer `m` (zero diagonal).
pub fn coactivation_matrix(r: &ModelRoutes, m: usize) -> Vec<Vec<f64>> {
    let e = r.n_experts[m];
    let mut c = vec![vec![0f64; e]; e];
    let mut load = vec![0f64; e];
    for t in 0..r.n_tokens() {
        let set = r.experts_of(m, t);
        for &a in set {
            let a = a as usize;
            if a >= e {
                continue;
            }
            load[a] += 1.0;
            for &b in set.iter().filter(|&&b| b as usize != a && (b as usize) < e) {
                c[a][b as usize] += 1.0;
            }
        }
    }
    for (row, &l) in c.iter_mut().zip(&load) {
        row.iter_mut().for_each(|v| *v /= l.max(1.0));
    }
    c
}

/// A measure of a layer, if it has one.
type Measure<'a> = &'a dyn Fn(&LayerStudy) -> Option<f64>;

fn model_series(models: &[ModelStudy], f: Measure<'_>, chance: Option<Measure<'_>>) -> Vec<Series> {
    let mut out = Vec::new();
    for (i, s) in models.iter().enumerate() {
        let color = expert_color(if i == 0 { 1 } else { 0 });
        out.push(Series {
            label: format!("{} ({})", s.label, s.family),
            color,
            dashed: false,
            points: s.layers.iter().filter_map(|l| f(l).map(|v| (l.depth, v))).collect(),
        });
        if let Some(ch) = chance {
            out.push(Series {
                label: format!("{}: chance", s.family),
                color,
                dashed: true,
                points: s.layers.iter().filter_map(|l| ch(l).map(|v| (l.depth, v))).collect(),
            });
        }
    }
    out
}

/// Writes the study's figures into `dir`; returns their file names.
pub fn write_all(models: &[ModelStudy], routes: &[&ModelRoutes], nmi: &[Vec<f64>], dir: &Path) -> Result<Vec<String>> {
    let size = crate::analysis::plots::DEFAULT_SIZE;
    let tall = (size.0, size.1 * 3 / 2);
    let mut written = Vec::new();
    let panel = |y: &str, series| Panel {
        y_desc: y.to_string(),
        series,
    };
    depth_panels(
        "Load balance by depth",
        &[
            panel("CV of expert loads", model_series(models, &|l| Some(l.balance.cv), None)),
            panel(
                "router entropy / ln E",
                model_series(models, &|l| Some(l.norm_router_entropy), None),
            ),
        ],
        tall,
        &dir.join("compare_balance.png"),
    )?;
    written.push("compare_balance.png".to_string());
    depth_panels(
        "Specialisation by depth (dashed: routes shuffled over tokens)",
        &[
            panel(
                "vocabulary specialisation",
                model_series(models, &|l| l.vocab_spec, Some(&|l| l.vocab_spec_chance)),
            ),
            panel(
                "domain NMI",
                model_series(models, &|l| Some(l.domain_nmi), Some(&|l| Some(l.domain_nmi_chance))),
            ),
        ],
        tall,
        &dir.join("compare_specialisation.png"),
    )?;
    written.push("compare_specialisation.png".to_string());
    depth_panels(
        "Routing stickiness between consecutive tokens (dashed: chance)",
        &[panel(
            "same first expert",
            model_series(models, &|l| l.stickiness, Some(&|l| Some(l.stickiness_chance))),
        )],
        size,
        &dir.join("compare_stickiness.png"),
    )?;
    written.push("compare_stickiness.png".to_string());
    for (i, r) in routes.iter().enumerate() {
        let Some(m) = r.k.iter().rposition(|&k| k > 1) else { continue };
        let name = format!("coactivation_{}.png", ["a", "b"].get(i).copied().unwrap_or("x"));
        let title = format!("{} ({}) layer {}: P(j chosen | i chosen)", r.label, r.family, r.layers[m]);
        matrix(
            &title,
            &coactivation_matrix(r, m),
            "expert j",
            "expert i",
            (900, 820),
            &dir.join(&name),
        )?;
        written.push(name);
    }
    if !nmi.is_empty() {
        let title = "Routing agreement over span-aligned tokens (NMI of first experts)";
        let (a, b) = (
            routes.first().map_or("A", |r| r.family.as_str()),
            routes.get(1).map_or("B", |r| r.family.as_str()),
        );
        matrix(
            title,
            nmi,
            &format!("{b} MoE layer"),
            &format!("{a} MoE layer"),
            (900, 700),
            &dir.join("alignment_nmi.png"),
        )?;
        written.push("alignment_nmi.png".to_string());
    }
    Ok(written)
}
