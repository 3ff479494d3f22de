//! `report.md` of the cross-model study: what was compared, one table per measure with both
//! models' layers by relative depth, the drift-to-imbalance verdicts, the span alignment, and the
//! figures.

use std::fmt::Write;

use super::measures::{LayerStudy, ModelStudy};
use super::Study;

fn opt(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.3}"))
}

fn name(m: &ModelStudy) -> String {
    format!("{} ({})", m.label, m.family)
}

/// One table: a row per MoE layer of each model, the columns given.
fn table(out: &mut String, models: &[ModelStudy], head: &[&str], row: &dyn Fn(&LayerStudy) -> Vec<String>) {
    let _ = writeln!(out, "| model | layer | depth | {} |", head.join(" | "));
    let _ = writeln!(out, "|---|---:|---:|{}|", head.iter().map(|_| "---:").collect::<Vec<_>>().join("|"));
    for m in models {
        for l in &m.layers {
            let _ = writeln!(out, "| {} | {} | {:.2} | {} |", m.family, l.layer, l.depth, row(l).join(" | "));
        }
    }
    out.push('\n');
}

/// The report as markdown.
pub fn render(s: &Study) -> String {
    let mut o = String::new();
    let models = &s.models;
    let _ = writeln!(o, "# Routing of two mixture-of-experts models on the same text\n");
    for (tag, m) in ["A", "B"].iter().zip(models) {
        let _ = writeln!(
            o,
            "- **{tag}**: {}: {} tokens, {} MoE layers, {} experts, top-{}{}{}",
            name(m),
            m.tokens,
            m.layers.len(),
            m.layers.first().map_or(0, |l| l.n_experts),
            m.layers.first().map_or(0, |l| l.k),
            if m.untrained { ", **random weights**" } else { "" },
            if m.resets > 0 {
                format!(", {} fresh caches where a source passed the context", m.resets)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "- **text**: {} source(s): {}",
        s.sources.len(),
        s.sources
            .iter()
            .map(|x| format!("{} ({} bytes)", x.name, x.bytes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "- each model reads the text with its own tokenizer, each source as one sequence; depth is (layer + ½) / layers; \
         chance values shuffle the routes over the tokens (seed {}).\n",
        s.seed
    );

    let _ = writeln!(o, "## Load balance\n");
    let _ = writeln!(
        o,
        "Loads count every one of the k choices. CV = std / mean of the loads (0 = even); entropy / ln E of the loads (1 = even); router entropy is the mean entropy of each token's router distribution over ln E (1 = undecided).\n"
    );
    table(
        &mut o,
        models,
        &["CV", "load entropy / ln E", "busiest share", "router entropy / ln E"],
        &|l| {
            vec![
                format!("{:.3}", l.balance.cv),
                format!("{:.3}", l.balance.norm_entropy),
                format!("{:.3}", l.balance.busiest_share),
                format!("{:.3}", l.norm_router_entropy),
            ]
        },
    );

    let _ = writeln!(o, "### Do later layers drift to imbalance?\n");
    for m in models {
        let d = &m.drift;
        let _ = writeln!(
            o,
            "- {}: CV slope over depth {:+.3}; first third {:.3}, last third {:.3}: {}.",
            name(m),
            d.cv_slope,
            d.first_third_cv,
            d.last_third_cv,
            if d.later_less_balanced {
                "the later layers are less balanced"
            } else {
                "no drift to imbalance"
            }
        );
    }
    o.push('\n');

    let _ = writeln!(o, "## Expert co-activation (top-k)\n");
    if models.iter().all(|m| m.layers.iter().all(|l| l.k < 2)) {
        let _ = writeln!(o, "Both models route each token to one expert: no co-activation to measure.\n");
    } else {
        let _ = writeln!(
            o,
            "Concentration = mean over experts i of the largest P(j chosen | i chosen); a router picking k of E uniformly gives (k − 1)/(E − 1). Top-1 layers have none.\n"
        );
        table(
            &mut o,
            models,
            &["concentration", "uniform", "most frequent pairs (tokens)"],
            &|l| {
                vec![
                    opt(l.coactivation),
                    opt(l.coactivation_uniform),
                    l.top_pairs
                        .iter()
                        .map(|(i, j, n)| format!("{i}+{j} ({n})"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            },
        );
    }

    let _ = writeln!(o, "## Specialisation\n");
    let _ = writeln!(
        o,
        "Vocabulary: the share of a token id's occurrences sent to its most frequent expert, over ids seen at least {} times. Domain: normalised mutual information of expert and source. Each beside its value with the routes shuffled over the tokens.\n",
        s.min_count
    );
    table(&mut o, models, &["vocabulary", "shuffled", "domain NMI", "shuffled"], &|l| {
        vec![
            opt(l.vocab_spec),
            opt(l.vocab_spec_chance),
            format!("{:.4}", l.domain_nmi),
            format!("{:.4}", l.domain_nmi_chance),
        ]
    });
    if s.sources.len() > 1 {
        let _ = writeln!(
            o,
            "Experts most over-used per source in each model's deepest MoE layer (share in the source / share overall):\n"
        );
        for m in models {
            let _ = writeln!(o, "- {}:", name(m));
            for (src, top) in s.sources.iter().zip(&m.domain_experts) {
                let list = top
                    .iter()
                    .map(|(e, lift)| format!("{e} (×{lift:.2})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(o, "  - {}: {list}", src.name);
            }
        }
        o.push('\n');
    }

    let _ = writeln!(o, "## Stickiness between consecutive tokens\n");
    table(
        &mut o,
        models,
        &["same first expert", "chance (Σ p²)", "set overlap", "shuffled"],
        &|l| {
            vec![
                opt(l.stickiness),
                format!("{:.3}", l.stickiness_chance),
                opt(l.set_overlap),
                opt(l.set_overlap_chance),
            ]
        },
    );

    let al = &s.alignment;
    let _ = writeln!(o, "## The two tokenisations, aligned by character spans\n");
    let _ = writeln!(
        o,
        "A has {} tokens, B {}; {:.1}% of A's tokens have exactly one of B's spans; {} pairs of overlapping tokens.\n",
        al.tokens_a,
        al.tokens_b,
        100.0 * al.same_spans,
        al.pairs
    );
    if let (Some(a), Some(b)) = (models.first(), models.get(1)) {
        let _ = writeln!(
            o,
            "NMI of the first experts over the aligned pairs (rows: A's MoE layers, columns: B's); with B shuffled over the pairs the largest value is {:.4}.\n",
            al.nmi_chance
        );
        let _ = writeln!(
            o,
            "| A layer | {} |",
            b.layers.iter().map(|l| format!("B {}", l.layer)).collect::<Vec<_>>().join(" | ")
        );
        let _ = writeln!(o, "|---:|{}|", b.layers.iter().map(|_| "---:").collect::<Vec<_>>().join("|"));
        for (la, row) in a.layers.iter().zip(&al.nmi) {
            let _ = writeln!(
                o,
                "| {} | {} |",
                la.layer,
                row.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>().join(" | ")
            );
        }
        o.push('\n');
    }

    if !s.plots.is_empty() {
        let _ = writeln!(o, "## Figures\n");
        for p in &s.plots {
            let _ = writeln!(o, "![{p}]({p})\n");
        }
    }
    let _ = writeln!(
        o,
        "---\nblackmamba {} `analyze --compare`; numbers also in compare.json.",
        s.version
    );
    o
}
