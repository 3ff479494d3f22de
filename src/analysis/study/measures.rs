//! The measures of the cross-model study, per model and MoE layer, each beside what the same
//! loads would give by chance (the routes shuffled over the tokens with a fixed seed), and the
//! span alignment of the two models' tokens.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::ModelRoutes;
use crate::analysis::metrics::{balance, mutual_information, Balance};
use crate::rng::Rng;

/// The measures of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStudy {
    /// Index of the layer in its model.
    pub layer: usize,
    /// (layer + ½) / layers: where the layer sits, comparable across models.
    pub depth: f64,
    /// Experts (E) and experts per token (k).
    pub n_experts: usize,
    pub k: usize,
    /// Loads over all k choices: CV and entropy.
    pub balance: Balance,
    /// Mean router entropy (nats) and the same over ln E.
    pub router_entropy: f64,
    pub norm_router_entropy: f64,
    /// k > 1: mean over experts of the largest P(j chosen | i chosen); `None` for top-1.
    pub coactivation: Option<f64>,
    /// The value of a router picking k experts uniformly: (k − 1)/(E − 1).
    pub coactivation_uniform: Option<f64>,
    /// The three pairs chosen together most often: (i, j, tokens).
    pub top_pairs: Vec<(u32, u32, u64)>,
    /// Share of a token id's occurrences (ids seen ≥ min_count times) sent to its most frequent
    /// expert, and the same with the routes shuffled.
    pub vocab_spec: Option<f64>,
    pub vocab_spec_chance: Option<f64>,
    /// Normalised mutual information of expert and source (domain specialisation), and shuffled.
    pub domain_nmi: f64,
    pub domain_nmi_chance: f64,
    /// Share of consecutive tokens (same source) whose first expert repeats, and Σ p² (chance).
    pub stickiness: Option<f64>,
    pub stickiness_chance: f64,
    /// Mean |S_t ∩ S_t+1| / k of consecutive expert sets, and shuffled.
    pub set_overlap: Option<f64>,
    pub set_overlap_chance: Option<f64>,
}

/// Whether balance worsens with depth: the slope of CV against relative depth and the mean CV of
/// the first and last third of the MoE layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthDrift {
    pub cv_slope: f64,
    pub first_third_cv: f64,
    pub last_third_cv: f64,
    /// The last third is less balanced than the first.
    pub later_less_balanced: bool,
}

/// One model's side of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStudy {
    pub label: String,
    pub family: String,
    pub untrained: bool,
    pub tokens: usize,
    /// Tokens per source.
    pub source_tokens: Vec<usize>,
    pub resets: usize,
    pub layers: Vec<LayerStudy>,
    pub drift: DepthDrift,
    /// For each source, the deepest MoE layer's three experts most over-used there (expert,
    /// share in the source / share overall).
    pub domain_experts: Vec<Vec<(u32, f64)>>,
}

fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
    let mut out = v.to_vec();
    let mut rng = Rng::new(seed);
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    out
}

/// Share of occurrences sent to each id's most frequent expert (ids seen ≥ `min_count` times).
pub fn vocab_specialisation(ids: &[u32], sets: &[&[u32]], min_count: u64) -> Option<f64> {
    let mut per_id: HashMap<u32, (u64, HashMap<u32, u64>)> = HashMap::new();
    for (&id, set) in ids.iter().zip(sets) {
        let entry = per_id.entry(id).or_default();
        entry.0 += 1;
        for &e in set.iter() {
            *entry.1.entry(e).or_default() += 1;
        }
    }
    let (mut top, mut occ) = (0u64, 0u64);
    for (n, experts) in per_id.values().filter(|(n, _)| *n >= min_count) {
        top += experts.values().copied().max().unwrap_or(0);
        occ += n;
    }
    (occ > 0).then(|| top as f64 / occ as f64)
}

/// Normalised mutual information of (expert, source) over every choice.
pub fn domain_nmi(sets: &[&[u32]], source: &[u16], n_experts: usize, n_sources: usize) -> f64 {
    let mut m = vec![vec![0u64; n_sources.max(1)]; n_experts.max(1)];
    for (set, &s) in sets.iter().zip(source) {
        for &e in set.iter() {
            if let Some(c) = m.get_mut(e as usize).and_then(|r| r.get_mut(usize::from(s))) {
                *c += 1;
            }
        }
    }
    mutual_information(&m).1
}

/// Share of consecutive pairs (same source) whose first expert repeats, and the mean overlap of
/// their sets.
pub fn stickiness(sets: &[&[u32]], source: &[u16]) -> (Option<f64>, Option<f64>) {
    let (mut pairs, mut same, mut overlap) = (0u64, 0u64, 0f64);
    for t in 1..sets.len() {
        if source[t] != source[t - 1] {
            continue;
        }
        let (a, b) = (sets[t - 1], sets[t]);
        pairs += 1;
        same += u64::from(a.first() == b.first());
        let k = a.len().max(1) as f64;
        overlap += a.iter().filter(|e| b.contains(e)).count() as f64 / k;
    }
    if pairs == 0 {
        return (None, None);
    }
    (Some(same as f64 / pairs as f64), Some(overlap / pairs as f64))
}

fn coactivation(sets: &[&[u32]], e: usize) -> (f64, Vec<(u32, u32, u64)>) {
    let mut m = vec![vec![0u64; e]; e];
    let mut load = vec![0u64; e];
    for set in sets {
        for &a in set.iter() {
            let Some(l) = load.get_mut(a as usize) else { continue };
            *l += 1;
            for &b in set.iter().filter(|&&b| b != a) {
                if let Some(c) = m.get_mut(a as usize).and_then(|r| r.get_mut(b as usize)) {
                    *c += 1;
                }
            }
        }
    }
    let used: Vec<usize> = (0..e).filter(|&i| load[i] > 0).collect();
    let conc = used
        .iter()
        .map(|&i| m[i].iter().copied().max().unwrap_or(0) as f64 / load[i] as f64)
        .sum::<f64>()
        / used.len().max(1) as f64;
    let mut pairs: Vec<(u32, u32, u64)> = (0..e)
        .flat_map(|i| ((i + 1)..e).map(move |j| (i, j)))
        .map(|(i, j)| (i as u32, j as u32, m[i][j]))
        .filter(|p| p.2 > 0)
        .collect();
    pairs.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    pairs.truncate(3);
    (conc, pairs)
}

/// The measures of MoE layer `m` of `r`.
pub fn layer_study(r: &ModelRoutes, m: usize, n_sources: usize, min_count: u64, seed: u64) -> LayerStudy {
    let (e, k) = (r.n_experts[m], r.k[m]);
    let sets: Vec<&[u32]> = (0..r.n_tokens()).map(|t| r.experts_of(m, t)).collect();
    let mut loads = vec![0u64; e];
    for &x in &r.experts[m] {
        if let Some(l) = loads.get_mut(x as usize) {
            *l += 1;
        }
    }
    let bal = balance(&loads);
    let h: f64 = r.entropy[m].iter().map(|&x| f64::from(x)).sum::<f64>() / r.entropy[m].len().max(1) as f64;
    let shuffled_sets = shuffled(&sets, seed ^ 0x5157);
    let (stick, overlap) = stickiness(&sets, &r.source);
    let (_, overlap_chance) = stickiness(&shuffled_sets, &r.source);
    let firsts: Vec<u64> = (0..e)
        .map(|x| sets.iter().filter(|s| s.first() == Some(&(x as u32))).count() as u64)
        .collect();
    let n_first: u64 = firsts.iter().sum();
    let (coact, top_pairs) = if k > 1 { coactivation(&sets, e) } else { (0.0, Vec::new()) };
    LayerStudy {
        layer: r.layers[m],
        depth: (r.layers[m] as f64 + 0.5) / r.num_layers.max(1) as f64,
        n_experts: e,
        k,
        balance: bal,
        router_entropy: h,
        norm_router_entropy: if e > 1 { h / (e as f64).ln() } else { 0.0 },
        coactivation: (k > 1).then_some(coact),
        coactivation_uniform: (k > 1 && e > 1).then(|| (k - 1) as f64 / (e - 1) as f64),
        top_pairs,
        vocab_spec: vocab_specialisation(&r.ids, &sets, min_count),
        vocab_spec_chance: vocab_specialisation(&r.ids, &shuffled_sets, min_count),
        domain_nmi: domain_nmi(&sets, &r.source, e, n_sources),
        domain_nmi_chance: domain_nmi(&shuffled_sets, &r.source, e, n_sources),
        stickiness: stick,
        stickiness_chance: firsts.iter().map(|&c| (c as f64 / n_first.max(1) as f64).powi(2)).sum(),
        set_overlap: (k > 1).then_some(overlap).flatten(),
        set_overlap_chance: (k > 1).then_some(overlap_chance).flatten(),
    }
}

/// The drift-to-imbalance check over a model's layers.
pub fn depth_drift(layers: &[LayerStudy]) -> DepthDrift {
    let n = layers.len();
    let xs: Vec<f64> = layers.iter().map(|l| l.depth).collect();
    let ys: Vec<f64> = layers.iter().map(|l| l.balance.cv).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (mx, my) = (mean(&xs), mean(&ys));
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let third = n.div_ceil(3).max(1);
    let first = mean(&ys[..third.min(n)]);
    let last = mean(&ys[n.saturating_sub(third)..]);
    DepthDrift {
        cv_slope: if sxx > 0.0 { sxy / sxx } else { 0.0 },
        first_third_cv: first,
        last_third_cv: last,
        later_less_balanced: n > 1 && last > first,
    }
}

/// One model's study over `n_sources` sources.
pub fn model_study(r: &ModelRoutes, n_sources: usize, min_count: u64, seed: u64) -> ModelStudy {
    let layers: Vec<LayerStudy> = (0..r.layers.len()).map(|m| layer_study(r, m, n_sources, min_count, seed)).collect();
    let drift = depth_drift(&layers);
    let mut source_tokens = vec![0usize; n_sources];
    for &s in &r.source {
        if let Some(c) = source_tokens.get_mut(usize::from(s)) {
            *c += 1;
        }
    }
    let last = r.layers.len() - 1;
    let e = r.n_experts[last];
    let mut counts = vec![vec![0u64; e]; n_sources];
    for t in 0..r.n_tokens() {
        for &x in r.experts_of(last, t) {
            if let Some(c) = counts.get_mut(usize::from(r.source[t])).and_then(|row| row.get_mut(x as usize)) {
                *c += 1;
            }
        }
    }
    let all: Vec<u64> = (0..e).map(|x| counts.iter().map(|row| row[x]).sum()).collect();
    let total: u64 = all.iter().sum();
    let domain_experts = counts
        .iter()
        .map(|row| {
            let n: u64 = row.iter().sum();
            let mut lift: Vec<(u32, f64)> = (0..e)
                .filter(|&x| all[x] > 0 && n > 0)
                .map(|x| (x as u32, (row[x] as f64 / n as f64) / (all[x] as f64 / total as f64)))
                .collect();
            lift.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            lift.truncate(3);
            lift
        })
        .collect();
    ModelStudy {
        label: r.label.clone(),
        family: r.family.clone(),
        untrained: r.untrained,
        tokens: r.n_tokens(),
        source_tokens,
        resets: r.resets,
        layers,
        drift,
        domain_experts,
    }
}
