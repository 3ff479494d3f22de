//! Sinkhorn over a window of router logits, both variants, reduced to what the Sinkhorn view
//! draws (convergence traces, loads, changed routes).

use crate::engine::protocol::{SinkhornLayer, SinkhornOrigin, SinkhornReport, SinkhornRun};
use crate::engine::telemetry::RouterHistory;
use crate::sinkhorn::{greedy, loads, sinkhorn, SinkhornOpts, SinkhornResult, Variant};

/// Runs Zyphra and Standard Sinkhorn on the last `window` tokens of every MoE layer.
pub fn window_report(hist: &RouterHistory, window: usize, max_iters: usize, tol: f64) -> SinkhornReport {
    let mut layers = Vec::new();
    let mut n_tokens = 0;
    for (slot, (&layer, &e)) in hist.layers.iter().zip(&hist.n_experts).enumerate() {
        let (cost, rows) = hist.window(slot, window);
        n_tokens = rows;
        let g = greedy(cost, rows, e);
        let runs = [Variant::Zyphra, Variant::Standard]
            .into_iter()
            .map(|variant| {
                let r = sinkhorn(cost, rows, e, &SinkhornOpts { variant, max_iters, tol });
                summarize(&r, &g, variant)
            })
            .collect();
        layers.push(SinkhornLayer {
            layer,
            n_experts: e,
            greedy_loads: loads(&g, e),
            runs,
        });
    }
    SinkhornReport {
        origin: SinkhornOrigin::Chat,
        window,
        n_tokens,
        layers,
    }
}

/// A run reduced to its traces, loads and the number of tokens it moves away from `greedy`.
pub fn summarize(r: &SinkhornResult, greedy: &[u32], variant: Variant) -> SinkhornRun {
    SinkhornRun {
        variant,
        rel_change: r.trace.iter().map(|i| i.rel_change as f32).collect(),
        row_err: r.trace.iter().map(|i| i.row_err as f32).collect(),
        col_err: r.trace.iter().map(|i| i.col_err as f32).collect(),
        converged: r.converged,
        loads: loads(&r.assignment, r.n_experts),
        changed: r.assignment.iter().zip(greedy).filter(|(a, b)| a != b).count(),
    }
}
