//! Routing analysis: per-token traces, an expert-specialisation report and its figures.
//!
//! The question the BlackMamba paper (arXiv 2402.01771) leaves open is whether experts specialise
//! in a Mamba-MoE as they do in Transformer MoEs, and why the later layers lose balance. The input
//! streams through the model in chunks that carry the recurrent state ([`input`]); the probe's
//! routes, router logits and state norms are either written per token ([`trace`]) or gathered
//! ([`collect()`]) into a [`report::Report`] (balance by depth, tokens per expert with PMI,
//! determinism, stickiness, co-activation, Sinkhorn on windows, drift between two models), written
//! as `report.json` and `report.md`, with PNG figures ([`plots`]). The measures themselves are
//! pure functions in [`metrics`], shared with the TUI.

pub mod collect;
pub mod input;
pub mod markdown;
pub mod metrics;
pub mod plots;
pub mod report;
pub mod study;
pub mod trace;

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::Result;
use crate::model::Model;

use collect::{Collected, RouteTable};
use input::{Input, StreamOpts, Streamer};
use report::Report;

/// How `analyze` gathers its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectOpts {
    pub stream: StreamOpts,
    /// Tokens per Sinkhorn window.
    pub window: usize,
    /// Cap on Sinkhorn iterations per window.
    pub max_iters: usize,
}

impl Default for CollectOpts {
    fn default() -> Self {
        Self {
            stream: StreamOpts::default(),
            window: 512,
            max_iters: 1000,
        }
    }
}

/// Streams the input through the model and gathers routes, Sinkhorn runs and state telemetry.
/// `progress` is told the number of tokens done after every chunk.
pub fn collect(model: &Model, tok: &Tokenizer, input: &Input, opts: CollectOpts, progress: &mut dyn FnMut(usize)) -> Result<Collected> {
    let mut c = Collected::new(opts.window, opts.max_iters);
    input::run_input(model, tok, input, opts.stream, &mut |chunk| {
        c.push(&chunk)?;
        progress(chunk.start + chunk.ids.len());
        Ok(())
    })?;
    c.finish();
    Ok(c)
}

/// The routes a model gives to known token ids (for `--compare`), fed with the same chunking.
pub fn routes_of(model: &Model, ids: &[u32], stream: StreamOpts, progress: &mut dyn FnMut(usize)) -> Result<RouteTable> {
    let mut rt = RouteTable::default();
    let mut s = Streamer::new(model, stream)?;
    let mut f = |chunk: input::Chunk<'_>| {
        rt.push(chunk.ids, chunk.probe)?;
        progress(chunk.start + chunk.ids.len());
        Ok(())
    };
    s.push(ids, &mut f)?;
    s.finish(&mut f)?;
    Ok(rt)
}

/// Figure file names written by [`write_plots`], in order.
pub const PLOT_FILES: [&str; 5] = [
    "route_heatmap.png",
    "load_bars.png",
    "balance_by_depth.png",
    "sinkhorn_convergence.png",
    "drift_by_layer.png",
];

/// Writes the report's figures into `dir` (the heatmap over the first `heatmap_tokens` tokens);
/// returns the file names written and records them in the report.
pub fn write_plots(report: &mut Report, routes: &RouteTable, tok: &Tokenizer, heatmap_tokens: usize, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut written = Vec::new();
    let size = plots::DEFAULT_SIZE;
    let n = heatmap_tokens.clamp(1, routes.n_tokens().max(1));
    let labels = if n <= 64 {
        Some(
            routes
                .ids
                .iter()
                .map(|&id| crate::tokenizer::decode(tok, &[id]))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    let layers: Vec<usize> = report.layers.iter().map(|l| l.layer).collect();
    let balances: Vec<metrics::Balance> = report.layers.iter().map(|l| l.balance.clone()).collect();
    if !layers.is_empty() {
        let heat_h = (150 + 34 * layers.len() as u32).clamp(320, 1400);
        plots::route_heatmap(routes, 0, n, labels.as_deref(), (size.0, heat_h), &dir.join(PLOT_FILES[0]))?;
        plots::load_bars(&layers, &balances, size, &dir.join(PLOT_FILES[1]))?;
        plots::balance_by_depth(&layers, &balances, size, &dir.join(PLOT_FILES[2]))?;
        written.extend(PLOT_FILES[..3].iter().map(|s| s.to_string()));
        let series: Vec<plots::ConvergenceSeries> = report
            .sinkhorn
            .variants
            .iter()
            .map(|v| plots::ConvergenceSeries {
                variant: v.variant.clone(),
                tol: v.tol,
                traces: v.layers.iter().map(|l| (l.layer, l.first_trace.clone())).collect(),
            })
            .collect();
        if series.iter().any(|s| s.traces.iter().any(|t| !t.1.is_empty())) {
            let h = (300 * series.len() as u32 + 60).max(size.1);
            plots::sinkhorn_convergence(&series, (size.0, h), &dir.join(PLOT_FILES[3]))?;
            written.push(PLOT_FILES[3].to_string());
        }
    }
    if let Some(d) = report.drift.as_ref().filter(|d| !d.layers.is_empty()) {
        plots::drift_by_layer(&d.layers, &d.other_model, size, &dir.join(PLOT_FILES[4]))?;
        written.push(PLOT_FILES[4].to_string());
    }
    report.meta.plots = written.clone();
    Ok(written)
}
