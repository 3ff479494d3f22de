//! The PNG curve of `bench --context`: decode tokens per second against context length (log
//! scale), one line per report, drawn with the analysis report's plotter
//! ([`crate::analysis::plots`]: bundled font, colour-blind-safe palette, atomic write).

use std::path::Path;

use plotters::prelude::*;

use super::context::ContextReport;
use crate::analysis::plots::{expert_color, write_png, DEFAULT_SIZE};
use crate::error::{Error, Result};

/// Draws tok/s against context for `reports` (each one line) into the PNG `path`.
pub fn latency_by_context(reports: &[ContextReport], path: &Path) -> Result<()> {
    let pts = reports.iter().flat_map(|r| r.rows.iter());
    let (lo, hi, top) = pts.fold((f64::MAX, 0f64, 0f64), |(lo, hi, top), r| {
        (lo.min(r.context as f64), hi.max(r.context as f64), top.max(r.tok_s))
    });
    if hi == 0.0 {
        return Err(Error::Invalid("--plot: no context was measured, nothing to draw".into()));
    }
    let (lo, hi, top) = (lo / 1.5, hi * 1.5, top.max(1e-9) * 1.15);
    write_png(path, DEFAULT_SIZE, |root| {
        let root = root.titled("Decode speed against context length", ("sans-serif", 22))?;
        let mut c = ChartBuilder::on(&root)
            .margin(16)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..top)?;
        c.configure_mesh()
            .x_desc("context (tokens in the cache or state)")
            .y_desc("decode tok/s")
            .x_label_formatter(&|x| {
                if *x >= 1024.0 {
                    format!("{:.0}k", x / 1024.0)
                } else {
                    format!("{x:.0}")
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        for (i, r) in reports.iter().enumerate() {
            let color = expert_color(i);
            let line: Vec<(f64, f64)> = r.rows.iter().map(|x| (x.context as f64, x.tok_s)).collect();
            c.draw_series(LineSeries::new(line.clone(), color.stroke_width(3)))?
                .label(format!(
                    "{} ({}, {} {}, {} fill)",
                    r.model,
                    r.family,
                    r.device,
                    r.dtype,
                    fill_name(r)
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
            c.draw_series(line.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
        Ok(())
    })
}

fn fill_name(r: &ContextReport) -> &'static str {
    match r.fill {
        super::context::ContextFill::Prefill => "prefill",
        super::context::ContextFill::Synthetic => "synthetic",
    }
}
