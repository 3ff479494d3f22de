//! The fine time breakdown of `bench --finetune --profile`: a few extra training steps with two
//! profilers on, each waiting for the device at every boundary it times:
//!
//! * the training forward by part: [`crate::ops::prof`] laps inside the half-blocks (the
//!   RMSNorm, the Mamba mixer's projections, conv and scan, the MoE router, the routing decision
//!   with its host copy and Sinkhorn, the experts' matmuls), pass 1 and the recomputed pass
//!   together;
//! * the backward by op: candle's backward pass timing each node's gradients by op kind, and the
//!   gradient accumulation under its own key (`candle_core::backprop::set_op_profile`, our patch
//!   of the vendored candle-core).
//!
//! The waits serialise the device and add their own latency, so these steps run slower than the
//! timed ones: the tables say where the time goes, not how fast an unprofiled step is.

use serde::Serialize;

/// One row of a profile table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProfRow {
    /// The part (forward) or op kind (backward).
    pub name: String,
    /// Milliseconds per step.
    pub ms_per_step: f64,
    /// Laps or nodes per step.
    pub calls_per_step: f64,
    /// Fraction of the table's total.
    pub share: f64,
}

/// The fine profile: both tables over the same steps.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FineProfile {
    /// Steps profiled.
    pub steps: usize,
    /// Median time of those steps, ms (slower than unprofiled: the device is waited for at
    /// every lap and backward node).
    pub step_ms: f64,
    /// The training forward's parts, ms per step (the sum of `forward`).
    pub forward_ms: f64,
    /// Forward parts, longest first (all of them; the text report shows the top rows).
    pub forward: Vec<ProfRow>,
    /// The backward's nodes and accumulation, ms per step (the sum of `backward`).
    pub backward_ms: f64,
    /// Backward op kinds, longest first.
    pub backward: Vec<ProfRow>,
}

/// Switches both profilers on or off (clearing their totals).
pub fn enable(on: bool) {
    crate::ops::prof::enable(on);
    candle_core::backprop::set_op_profile(on);
}

/// Rows from (name, ms, count) totals over `steps` steps, longest first, with their sum.
fn rows(totals: Vec<(String, f64, usize)>, steps: usize) -> (f64, Vec<ProfRow>) {
    let per = steps.max(1) as f64;
    let sum: f64 = totals.iter().map(|t| t.1).sum::<f64>() / per;
    let mut v: Vec<ProfRow> = totals
        .into_iter()
        .map(|(name, ms, n)| ProfRow {
            name,
            ms_per_step: ms / per,
            calls_per_step: n as f64 / per,
            share: if sum > 0.0 { ms / per / sum } else { 0.0 },
        })
        .collect();
    v.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
    (sum, v)
}

/// Reads both profilers' totals (call before [`enable`]`(false)`, which clears them).
pub fn collect(steps: usize, step_ms: f64) -> FineProfile {
    let fwd = crate::ops::prof::totals()
        .into_iter()
        .map(|(n, ms, c)| (n.to_string(), ms, c))
        .collect();
    let bwd = candle_core::backprop::op_profile_totals()
        .into_iter()
        .map(|(n, s, c)| (n, s * 1e3, c))
        .collect();
    let (forward_ms, forward) = rows(fwd, steps);
    let (backward_ms, backward) = rows(bwd, steps);
    FineProfile {
        steps,
        step_ms,
        forward_ms,
        forward,
        backward_ms,
        backward,
    }
}

/// A table of the `top` longest rows as text lines (a heading, the rows, one line for the rest).
pub fn table(title: &str, total_ms: f64, rows: &[ProfRow], top: usize) -> Vec<String> {
    let mut out = vec![
        format!("{title}: {total_ms:.1} ms per step"),
        format!("  {:<40} {:>10} {:>7} {:>11}", "", "ms/step", "share", "calls/step"),
    ];
    for r in rows.iter().take(top) {
        out.push(format!(
            "  {:<40} {:>10.2} {:>6.1}% {:>11.1}",
            r.name,
            r.ms_per_step,
            100.0 * r.share,
            r.calls_per_step
        ));
    }
    if rows.len() > top {
        let rest = &rows[top..];
        let ms: f64 = rest.iter().map(|r| r.ms_per_step).sum();
        let share: f64 = rest.iter().map(|r| r.share).sum();
        out.push(format!(
            "  {:<40} {:>10.2} {:>6.1}%",
            format!("({} more)", rest.len()),
            ms,
            100.0 * share
        ));
    }
    out
}

/// Both tables as text, `top` rows each; `recomputed`: whether the step recomputed activations
/// (then the forward rows hold pass 1 and the recomputed pass).
pub fn report_lines(p: &FineProfile, recomputed: bool, top: usize) -> Vec<String> {
    let mut out = vec![format!(
        "fine profile ({} step{}, the device waited for at every lap and backward node: {:.1} ms per step, slower than unprofiled)",
        p.steps,
        if p.steps == 1 { "" } else { "s" },
        p.step_ms
    )];
    let title = if recomputed {
        "training forward by part (half-blocks; pass 1 and the recomputed pass)"
    } else {
        "training forward by part (half-blocks)"
    };
    out.extend(table(title, p.forward_ms, &p.forward, top));
    out.extend(table(
        "backward by op (each node's input gradients)",
        p.backward_ms,
        &p.backward,
        top,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_per_step_and_sorted() {
        let (sum, r) = rows(vec![("a".into(), 2.0, 2), ("b".into(), 6.0, 4)], 2);
        assert!((sum - 4.0).abs() < 1e-12);
        assert_eq!(r[0].name, "b");
        assert!((r[0].ms_per_step - 3.0).abs() < 1e-12 && (r[0].calls_per_step - 2.0).abs() < 1e-12);
        assert!((r[0].share - 0.75).abs() < 1e-12);
        let t = table("t", sum, &r, 1);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(t[3].contains("(1 more)"), "{t:?}");
    }
}
