//! `report.md`: the [`Report`] as Markdown for a paper appendix. A pure function of the report, so
//! `report.md` always says what `report.json` holds.

use std::fmt::Write;

use super::report::Report;

/// A token's text with its whitespace made visible: ␣ space, ↵ newline, ⇥ tab, ∅ empty.
pub fn show_token(text: &str) -> String {
    if text.is_empty() {
        return "∅".into();
    }
    let mut s = String::new();
    for c in text.chars() {
        match c {
            ' ' => s.push('␣'),
            '\n' => s.push('↵'),
            '\t' => s.push('⇥'),
            '\r' => s.push('␍'),
            c if c.is_control() => {
                let _ = write!(s, "\\u{{{:x}}}", c as u32);
            }
            c => s.push(c),
        }
    }
    s
}

/// A token as a Markdown code span safe inside a table cell.
fn md_token(text: &str) -> String {
    let t = show_token(text).replace('|', "\\|");
    if t.contains('`') {
        format!("`` {t} ``")
    } else {
        format!("`{t}`")
    }
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn opt(x: Option<f64>, f: fn(f64) -> String) -> String {
    x.map_or_else(|| "–".into(), f)
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// "layer 3" or "layers 1–17" for a run of layer reports.
fn span(ls: &[super::report::LayerReport]) -> String {
    match ls {
        [one] => format!("layer {}", one.layer),
        [first, .., last] => format!("layers {}–{}", first.layer, last.layer),
        [] => "no layer".into(),
    }
}

/// Renders the whole report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    header(&mut s, r);
    summary(&mut s, r);
    balance(&mut s, r);
    sticky(&mut s, r);
    tokens(&mut s, r);
    coactivation(&mut s, r);
    sinkhorn(&mut s, r);
    mamba(&mut s, r);
    drift(&mut s, r);
    figures(&mut s, r);
    definitions(&mut s, r);
    s
}

fn header(s: &mut String, r: &Report) {
    let m = &r.meta;
    let _ = writeln!(s, "# Routing report: {}\n", m.model);
    if m.untrained {
        let _ = writeln!(
            s,
            "> **Note:** this model has untrained random weights; its routing says nothing about a trained BlackMamba.\n"
        );
    }
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| input | {} |", m.input.replace('|', "\\|"));
    let _ = writeln!(s, "| tokens | {} ({} distinct ids) |", m.tokens, m.distinct_ids);
    let _ = writeln!(
        s,
        "| half-blocks | {} ({} MoE: {}) |",
        m.num_layers,
        m.moe_layers.len(),
        m.moe_layers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    let seq = if m.reset_every == 0 {
        "one sequence (state carried through the whole input)".to_string()
    } else {
        format!("fresh state every {} tokens", m.reset_every)
    };
    let _ = writeln!(s, "| state | {seq}; forward chunks of {} tokens |", m.chunk);
    let _ = writeln!(s, "| routing | greedy top-1 (argmax of the router logits, as at inference) |");
    let _ = writeln!(s, "| blackmamba | {} |\n", m.version);
}

fn summary(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## Summary\n");
    if r.layers.is_empty() {
        let _ = writeln!(s, "The model has no MoE layers.\n");
        return;
    }
    let half = r.layers.len() / 2;
    let (early, late) = r.layers.split_at(half.max(1).min(r.layers.len()));
    if let (Some(a), Some(b)) = (mean(early.iter().map(|l| l.balance.cv)), mean(late.iter().map(|l| l.balance.cv))) {
        if !late.is_empty() {
            let _ = writeln!(
                s,
                "- Balance by depth: the mean CV of the expert loads is {} in {} and {} in {}.",
                f3(a),
                span(early),
                f3(b),
                span(late)
            );
        }
    }
    if let Some(worst) = r.layers.iter().max_by(|a, b| a.balance.cv.total_cmp(&b.balance.cv)) {
        let _ = writeln!(
            s,
            "- Least balanced: layer {} (CV {}; expert {} takes {} of the tokens).",
            worst.layer,
            f3(worst.balance.cv),
            worst.balance.busiest,
            pct(worst.balance.busiest_share)
        );
    }
    if let (Some(st), Some(ch)) = (
        mean(r.layers.iter().filter_map(|l| l.stickiness)),
        mean(r.layers.iter().map(|l| l.chance_stickiness)),
    ) {
        let _ = writeln!(
            s,
            "- Consecutive tokens share their expert {} of the time on average (chance {}).",
            pct(st),
            pct(ch)
        );
    }
    if let (Some(d), Some(ch)) = (
        mean(r.layers.iter().filter_map(|l| l.determinism.share)),
        mean(r.layers.iter().filter_map(|l| l.chance_determinism)),
    ) {
        let _ = writeln!(
            s,
            "- A repeated token id takes its usual expert {} of the time on average (shuffled routes: {}).",
            pct(d),
            pct(ch)
        );
    }
    for v in &r.sinkhorn.variants {
        if let (Some(d), Some(it)) = (
            mean(v.layers.iter().map(|l| l.disagreement)),
            mean(v.layers.iter().map(|l| l.mean_iters)),
        ) {
            let _ = writeln!(
                s,
                "- Sinkhorn ({}) on windows of {} tokens re-routes {} of the tokens and stops after {:.1} iterations on average.",
                v.variant,
                r.sinkhorn.window,
                pct(d),
                it
            );
        }
    }
    if let Some(d) = &r.drift {
        if let Some(x) = mean(d.layers.iter().map(|l| l.share)) {
            let _ = writeln!(s, "- Against {}, {} of the routes change on average.", d.other_model, pct(x));
        }
    }
    s.push('\n');
}

fn balance(s: &mut String, r: &Report) {
    let e = r.layers.iter().map(|l| l.balance.loads.len()).max().unwrap_or(0);
    let _ = writeln!(s, "## 1. Expert load by depth\n");
    let _ = writeln!(s, "Share of the tokens each expert takes, and how even that is.\n");
    let heads: String = (0..e).map(|x| format!(" e{x} |")).collect();
    let _ = writeln!(s, "| layer |{heads} CV | entropy | H/ln E | busiest | mean gate |");
    let _ = writeln!(s, "|---:|{}---:|---:|---:|---:|---:|", "---:|".repeat(e));
    for l in &r.layers {
        let b = &l.balance;
        let shares: String = (0..e)
            .map(|x| match b.loads.get(x) {
                Some(&c) => format!(" {} |", pct(if b.tokens > 0 { c as f64 / b.tokens as f64 } else { 0.0 })),
                None => " |".into(),
            })
            .collect();
        let gate = mean(l.mean_gate.iter().zip(&b.loads).filter(|(_, &c)| c > 0).map(|(&g, _)| g));
        let _ = writeln!(
            s,
            "| {} |{shares} {} | {} | {} | e{} ({}) | {} |",
            l.layer,
            f3(b.cv),
            f3(b.entropy),
            f3(b.norm_entropy),
            b.busiest,
            pct(b.busiest_share),
            opt(gate, f3)
        );
    }
    s.push('\n');
}

fn sticky(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## 2. Stickiness and token-id determinism\n");
    let _ = writeln!(
        s,
        "| layer | stickiness | chance (Σp²) | determinism | chance (shuffled) | repeated ids | their tokens |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    for l in &r.layers {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            l.layer,
            opt(l.stickiness, pct),
            pct(l.chance_stickiness),
            opt(l.determinism.share, pct),
            opt(l.chance_determinism, pct),
            l.determinism.repeated_ids,
            l.determinism.occurrences
        );
    }
    s.push('\n');
}

fn tokens(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## 3. What each expert sees\n");
    let _ = writeln!(
        s,
        "Most frequent tokens (count) and most over-represented tokens (PMI; routed here / all occurrences), PMI ranked among tokens routed to the expert at least {} times.\n",
        r.meta.opts.min_count
    );
    for le in &r.experts {
        let _ = writeln!(s, "### Layer {}\n", le.layer);
        let _ = writeln!(s, "| expert | tokens | most frequent | most over-represented |");
        let _ = writeln!(s, "|---:|---:|---|---|");
        for x in &le.experts {
            let freq: Vec<String> = x.frequent.iter().map(|t| format!("{} {}", md_token(&t.text), t.count)).collect();
            let over: Vec<String> = x
                .overrepresented
                .iter()
                .map(|t| format!("{} {:.2} ({}/{})", md_token(&t.text), t.pmi, t.count, t.total))
                .collect();
            let _ = writeln!(s, "| e{} | {} | {} | {} |", x.expert, x.load, freq.join(", "), over.join(", "));
        }
        s.push('\n');
    }
}

fn coactivation(s: &mut String, r: &Report) {
    if r.coactivation.is_empty() {
        return;
    }
    let _ = writeln!(s, "## 4. Co-activation of successive MoE layers\n");
    let _ = writeln!(s, "| from → to | mutual information (nats) | normalised MI |");
    let _ = writeln!(s, "|---|---:|---:|");
    for c in &r.coactivation {
        let _ = writeln!(s, "| {} → {} | {} | {} |", c.from_layer, c.to_layer, f3(c.mutual_info), f3(c.nmi));
    }
    let _ = writeln!(
        s,
        "\n<details><summary>Matrices: row = expert in the first layer, column = expert in the next; share of the row's tokens</summary>\n"
    );
    for c in &r.coactivation {
        let eb = c.counts.first().map_or(0, Vec::len);
        let _ = writeln!(s, "Layer {} → {}\n", c.from_layer, c.to_layer);
        let heads: String = (0..eb).map(|x| format!(" e{x} |")).collect();
        let _ = writeln!(s, "| |{heads} tokens |");
        let _ = writeln!(s, "|---:|{}---:|", "---:|".repeat(eb));
        for (a, row) in c.counts.iter().enumerate() {
            let n: u64 = row.iter().sum();
            let cells: String = row
                .iter()
                .map(|&x| {
                    format!(
                        " {} |",
                        if n > 0 {
                            format!("{:.0}", 100.0 * x as f64 / n as f64)
                        } else {
                            "–".into()
                        }
                    )
                })
                .collect();
            let _ = writeln!(s, "| e{a} |{cells} {n} |");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "</details>\n");
}

fn sinkhorn(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## 5. Sinkhorn on windows of {} tokens\n", r.sinkhorn.window);
    let _ = writeln!(
        s,
        "What training-time Sinkhorn routing would do to the router logits of each window (no model output changes).\n"
    );
    for v in &r.sinkhorn.variants {
        let _ = writeln!(s, "### {} (tol {:e}, cap {} iterations)\n", v.variant, v.tol, v.max_iters);
        let _ = writeln!(
            s,
            "| layer | windows | re-routed | mean iters | max iters | converged | CV greedy | CV Sinkhorn |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &v.layers {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {} | {}/{} | {} | {} |",
                l.layer,
                l.windows,
                pct(l.disagreement),
                l.mean_iters,
                l.max_iters,
                l.converged,
                l.windows,
                f3(l.cv_greedy),
                f3(l.cv_sinkhorn)
            );
        }
        s.push('\n');
    }
}

fn mamba(s: &mut String, r: &Report) {
    if r.mamba.is_empty() {
        return;
    }
    let _ = writeln!(s, "## 6. Mamba state by depth\n");
    let _ = writeln!(s, "| layer | mean ‖h‖ | max ‖h‖ | mean ‖conv‖ | mean Δ |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
    for m in &r.mamba {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.4} |",
            m.layer,
            f3(m.mean_ssm_norm),
            f3(m.max_ssm_norm),
            f3(m.mean_conv_norm),
            m.mean_delta
        );
    }
    s.push('\n');
}

fn drift(s: &mut String, r: &Report) {
    let Some(d) = &r.drift else { return };
    let _ = writeln!(s, "## 7. Routing drift against {}\n", d.other_model);
    let _ = writeln!(s, "| layer | changed | share | chance | CV here | CV there |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for (l, here) in d.layers.iter().zip(&r.layers) {
        let _ = writeln!(
            s,
            "| {} | {}/{} | {} | {} | {} | {} |",
            l.layer,
            l.changed,
            l.tokens,
            pct(l.share),
            pct(l.chance),
            f3(here.balance.cv),
            f3(l.other_balance.cv)
        );
    }
    s.push('\n');
}

fn figures(s: &mut String, r: &Report) {
    if r.meta.plots.is_empty() {
        return;
    }
    let _ = writeln!(s, "## Figures\n");
    for p in &r.meta.plots {
        let _ = writeln!(s, "![{}]({})\n", p.trim_end_matches(".png").replace('_', " "), p);
    }
}

fn definitions(s: &mut String, r: &Report) {
    let _ = writeln!(s, "## Definitions\n");
    let _ = writeln!(
        s,
        "- **CV**: population standard deviation of the expert loads over their mean (0 = even).\n\
         - **entropy**: of the load distribution in nats; H/ln E is 1 for even loads.\n\
         - **stickiness**: share of consecutive token pairs routed to the same expert; chance Σp² assumes independent tokens with the same loads.\n\
         - **determinism**: over token ids seen at least twice, the share of their occurrences on the id's most common expert; chance is the same after shuffling the routes over positions (seed {}).\n\
         - **PMI** of token t and expert e: ln(c(t,e)·T / (c(t)·c(e))).\n\
         - **normalised MI**: I(a;b)/√(H(a)H(b)) of the experts two successive MoE layers pick for the same token.\n\
         - **re-routed**: share of tokens whose Sinkhorn expert (argmax of the balanced plan) differs from the greedy one.\n\
         - **drift**: share of tokens whose expert differs between the two models; chance 1−Σpₐp_b assumes independent routings with the same loads.",
        r.meta.opts.seed
    );
}

impl Report {
    /// Writes `report.json` and `report.md` (rendered by [`render`]) into `dir` (created if
    /// missing), atomically. Here rather than beside the report's type, so that the type does not
    /// depend on its rendering.
    pub fn write(&self, dir: &std::path::Path) -> crate::error::Result<()> {
        use crate::error::Error;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(format!("report.json: {e}")))?;
        crate::model::weights::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        crate::model::weights::write_atomic(&dir.join("report.md"), render(self).as_bytes())
    }
}
