//! Routing metrics as pure functions over plain data (expert ids, token ids, counts), shared by
//! the `analyze` report and the TUI. Entropies and mutual information are in nats.
//!
//! A route is the expert one MoE layer chose for each token, in token order: `&[u8]` (at most 9
//! experts, SPEC §2).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// How evenly one layer spreads its tokens over the experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Balance {
    /// (E) tokens per expert
    pub loads: Vec<u64>,
    /// Σ loads
    pub tokens: u64,
    /// Coefficient of variation of the loads: population std / mean (0 = perfectly even).
    pub cv: f64,
    /// Entropy of the load distribution, in [0, ln E].
    pub entropy: f64,
    /// entropy / ln E, in [0, 1] (1 = perfectly even).
    pub norm_entropy: f64,
    /// The expert with the most tokens (the first on ties).
    pub busiest: usize,
    /// Its share of the tokens, in [1/E, 1].
    pub busiest_share: f64,
}

/// Tokens per expert of a route.
pub fn loads(route: &[u8], n_experts: usize) -> Vec<u64> {
    let mut l = vec![0u64; n_experts];
    for &e in route {
        if let Some(x) = l.get_mut(usize::from(e)) {
            *x += 1;
        }
    }
    l
}

/// Balance measures of a load vector. All zeros (no tokens) gives cv 0, entropy 0, share 0.
pub fn balance(loads: &[u64]) -> Balance {
    let tokens: u64 = loads.iter().sum();
    let e = loads.len();
    let (busiest, max) = loads
        .iter()
        .enumerate()
        .fold((0, 0), |best, (i, &l)| if l > best.1 { (i, l) } else { best });
    let entropy = entropy(loads);
    Balance {
        loads: loads.to_vec(),
        tokens,
        cv: cv(loads),
        entropy,
        norm_entropy: if e > 1 { entropy / (e as f64).ln() } else { 0.0 },
        busiest,
        busiest_share: if tokens > 0 { max as f64 / tokens as f64 } else { 0.0 },
    }
}

/// Shannon entropy (nats) of the distribution `counts / Σ counts`; 0 for no counts.
pub fn entropy(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    -counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            p * p.ln()
        })
        .sum::<f64>()
}

/// Coefficient of variation (population std / mean); 0 for no counts.
pub fn cv(counts: &[u64]) -> f64 {
    if counts.is_empty() {
        return 0.0;
    }
    let k = counts.len() as f64;
    let mean = counts.iter().sum::<u64>() as f64 / k;
    if mean == 0.0 {
        return 0.0;
    }
    let var = counts.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / k;
    var.sqrt() / mean
}

/// Share of consecutive token pairs (t, t+1) that take the same expert; `None` below 2 tokens.
pub fn stickiness(route: &[u8]) -> Option<f64> {
    if route.len() < 2 {
        return None;
    }
    let same = route.windows(2).filter(|w| w[0] == w[1]).count();
    Some(same as f64 / (route.len() - 1) as f64)
}

/// The stickiness expected if successive tokens routed independently with the same loads: Σ p².
pub fn chance_stickiness(loads: &[u64]) -> f64 {
    let n: u64 = loads.iter().sum();
    if n == 0 {
        return 0.0;
    }
    loads.iter().map(|&c| (c as f64 / n as f64).powi(2)).sum()
}

/// Token-id determinism of one layer: how often a repeated token id takes its usual expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Determinism {
    /// Σ over ids seen ≥ 2 times of (occurrences on the id's modal expert) / Σ of occurrences;
    /// `None` when no id repeats.
    pub share: Option<f64>,
    /// Distinct ids seen at least twice.
    pub repeated_ids: u64,
    /// Their occurrences.
    pub occurrences: u64,
}

/// Token-id determinism of a route (`ids` and `route` aligned, same length).
pub fn determinism(ids: &[u32], route: &[u8], n_experts: usize) -> Determinism {
    let mut per_id: HashMap<u32, Vec<u64>> = HashMap::new();
    for (&id, &e) in ids.iter().zip(route) {
        let c = per_id.entry(id).or_insert_with(|| vec![0; n_experts]);
        if let Some(x) = c.get_mut(usize::from(e)) {
            *x += 1;
        }
    }
    let (mut modal, mut occ, mut ids_n) = (0u64, 0u64, 0u64);
    for c in per_id.values() {
        let n: u64 = c.iter().sum();
        if n >= 2 {
            modal += c.iter().copied().max().unwrap_or(0);
            occ += n;
            ids_n += 1;
        }
    }
    Determinism {
        share: (occ > 0).then(|| modal as f64 / occ as f64),
        repeated_ids: ids_n,
        occurrences: occ,
    }
}

/// The determinism a route would show by chance: the same statistic after shuffling the experts
/// over the positions (same loads, same ids), with a fixed seed so reports are reproducible.
pub fn chance_determinism(ids: &[u32], route: &[u8], n_experts: usize, seed: u64) -> Option<f64> {
    let mut shuffled = route.to_vec();
    let mut rng = Rng::new(seed);
    for i in (1..shuffled.len()).rev() {
        let j = rng.below(i + 1);
        shuffled.swap(i, j);
    }
    determinism(ids, &shuffled, n_experts).share
}

/// Co-activation counts of two routes over the same tokens: `m[a][b]` = tokens that took expert
/// `a` in the first layer and `b` in the second. (Ea, Eb)
pub fn coactivation(first: &[u8], ea: usize, second: &[u8], eb: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; eb]; ea];
    for (&a, &b) in first.iter().zip(second) {
        if let Some(x) = m.get_mut(usize::from(a)).and_then(|r| r.get_mut(usize::from(b))) {
            *x += 1;
        }
    }
    m
}

/// Mutual information (nats) of a contingency table and its normalised form MI / √(H(a)·H(b))
/// in [0, 1] (0 when either side has zero entropy).
pub fn mutual_information(m: &[Vec<u64>]) -> (f64, f64) {
    let rows: Vec<u64> = m.iter().map(|r| r.iter().sum()).collect();
    let nb = m.first().map_or(0, Vec::len);
    let cols: Vec<u64> = (0..nb).map(|j| m.iter().map(|r| r.get(j).copied().unwrap_or(0)).sum()).collect();
    let n: u64 = rows.iter().sum();
    if n == 0 {
        return (0.0, 0.0);
    }
    let nf = n as f64;
    let mut mi = 0.0;
    for (i, r) in m.iter().enumerate() {
        for (j, &c) in r.iter().enumerate() {
            if c > 0 {
                mi += c as f64 / nf * (c as f64 * nf / (rows[i] as f64 * cols[j] as f64)).ln();
            }
        }
    }
    let mi = mi.max(0.0);
    let h = (entropy(&rows) * entropy(&cols)).sqrt();
    (mi, if h > 0.0 { (mi / h).min(1.0) } else { 0.0 })
}

/// Pointwise mutual information ln( p(t,e) / (p(t)·p(e)) ) from counts: `joint` = c(t,e),
/// `token` = c(t), `expert` = c(e), `total` = T. Finite whenever all counts are ≥ 1.
pub fn pmi(joint: u64, token: u64, expert: u64, total: u64) -> f64 {
    ((joint as f64 * total as f64) / (token as f64 * expert as f64)).ln()
}

/// Count of one token id on one expert, with its PMI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCount {
    pub id: u32,
    /// The id decoded on its own (filled in by the report; empty here).
    pub text: String,
    /// c(t, e): occurrences of the id routed to the expert.
    pub count: u64,
    /// c(t): all occurrences of the id in the input.
    pub total: u64,
    pub pmi: f64,
}

/// Per expert of one layer: its `top` most frequent token ids and its `top` most
/// over-represented ones (highest PMI among ids with c(t,e) ≥ `min_count`), as
/// `(frequent, overrepresented)` per expert.
pub fn expert_tokens(ids: &[u32], route: &[u8], n_experts: usize, top: usize, min_count: u64) -> Vec<(Vec<TokenCount>, Vec<TokenCount>)> {
    let mut joint: Vec<HashMap<u32, u64>> = vec![HashMap::new(); n_experts];
    let mut token: HashMap<u32, u64> = HashMap::new();
    for (&id, &e) in ids.iter().zip(route) {
        if let Some(j) = joint.get_mut(usize::from(e)) {
            *j.entry(id).or_insert(0) += 1;
            *token.entry(id).or_insert(0) += 1;
        }
    }
    let total: u64 = token.values().sum();
    joint
        .iter()
        .map(|j| {
            let ce: u64 = j.values().sum();
            let mut all: Vec<TokenCount> = j
                .iter()
                .map(|(&id, &count)| {
                    let total_t = token.get(&id).copied().unwrap_or(count);
                    TokenCount {
                        id,
                        text: String::new(),
                        count,
                        total: total_t,
                        pmi: pmi(count, total_t, ce, total),
                    }
                })
                .collect();
            all.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
            let frequent = all.iter().take(top).cloned().collect();
            let mut over: Vec<TokenCount> = all.into_iter().filter(|t| t.count >= min_count.max(1)).collect();
            over.sort_by(|a, b| b.pmi.total_cmp(&a.pmi).then(b.count.cmp(&a.count)).then(a.id.cmp(&b.id)));
            over.truncate(top);
            (frequent, over)
        })
        .collect()
}

/// Tokens whose expert differs between two routes of the same tokens.
pub fn changed(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

/// The share of changed experts expected if the two routes were independent with these loads:
/// 1 − Σₑ pₐ(e)·p_b(e).
pub fn chance_drift(loads_a: &[u64], loads_b: &[u64]) -> f64 {
    let (na, nb): (u64, u64) = (loads_a.iter().sum(), loads_b.iter().sum());
    if na == 0 || nb == 0 {
        return 0.0;
    }
    1.0 - loads_a
        .iter()
        .zip(loads_b)
        .map(|(&a, &b)| a as f64 / na as f64 * (b as f64 / nb as f64))
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn balance_even_and_skewed() {
        let even = balance(&[5, 5, 5, 5]);
        assert_eq!(even.tokens, 20);
        assert!(even.cv.abs() < 1e-12);
        assert!((even.entropy - 4f64.ln()).abs() < 1e-12);
        assert!((even.norm_entropy - 1.0).abs() < 1e-12);
        assert!((even.busiest_share - 0.25).abs() < 1e-12);

        let one = balance(&[0, 0, 12, 0]);
        assert_eq!(one.busiest, 2);
        assert!((one.busiest_share - 1.0).abs() < 1e-12);
        assert!(one.entropy.abs() < 1e-12);
        // std of (0,0,12,0) = √27, mean 3 → cv √3
        assert!((one.cv - 3f64.sqrt()).abs() < 1e-12);

        let none = balance(&[0, 0]);
        assert_eq!((none.cv, none.entropy, none.busiest_share), (0.0, 0.0, 0.0));
    }

    #[test]
    fn loads_count_every_token() {
        let r = [0u8, 1, 1, 3, 3, 3];
        assert_eq!(loads(&r, 4), vec![1, 2, 0, 3]);
        assert_eq!(loads(&r, 4).iter().sum::<u64>(), r.len() as u64);
    }

    #[test]
    fn stickiness_counts_pairs() {
        assert_eq!(stickiness(&[1]), None);
        assert_eq!(stickiness(&[1, 1, 2, 2, 2]), Some(3.0 / 4.0));
        assert_eq!(stickiness(&[0, 1, 0, 1]), Some(0.0));
        assert!((chance_stickiness(&[2, 2]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn determinism_uses_modal_expert_of_repeated_ids() {
        // id 7: experts 0,0,1 (modal 2 of 3); id 9: 2,2 (2 of 2); id 5 once: ignored.
        let ids = [7, 9, 7, 5, 9, 7];
        let route = [0u8, 2, 0, 1, 2, 1];
        let d = determinism(&ids, &route, 3);
        assert_eq!((d.repeated_ids, d.occurrences), (2, 5));
        assert!((d.share.unwrap() - 4.0 / 5.0).abs() < 1e-12);
        assert_eq!(determinism(&[1, 2], &[0, 0], 2).share, None);
        // A route that is a function of the id is fully deterministic; shuffling breaks it.
        let ids: Vec<u32> = (0..400).map(|i| i % 4).collect();
        let route: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        assert_eq!(determinism(&ids, &route, 4).share, Some(1.0));
        assert!(chance_determinism(&ids, &route, 4, 1).unwrap() < 0.5);
    }

    #[test]
    fn coactivation_and_mutual_information() {
        let a = [0u8, 0, 1, 1];
        let same = coactivation(&a, 2, &a, 2);
        assert_eq!(same, vec![vec![2, 0], vec![0, 2]]);
        let (mi, nmi) = mutual_information(&same);
        assert!((mi - 2f64.ln()).abs() < 1e-12);
        assert!((nmi - 1.0).abs() < 1e-12);
        let indep = coactivation(&a, 2, &[0, 1, 0, 1], 2);
        let (mi, nmi) = mutual_information(&indep);
        assert!(mi.abs() < 1e-12 && nmi.abs() < 1e-12);
    }

    #[test]
    fn pmi_ranks_specialised_tokens() {
        // Expert 1 gets every id-3 token; id 1 is spread evenly.
        let ids = [1, 1, 1, 1, 3, 3, 3];
        let route = [0u8, 1, 0, 1, 1, 1, 1];
        let per = expert_tokens(&ids, &route, 2, 5, 1);
        let (freq1, over1) = &per[1];
        assert_eq!(freq1[0].id, 3);
        assert_eq!((freq1[0].count, freq1[0].total), (3, 3));
        assert_eq!(over1[0].id, 3);
        // p(3,e1) = 3/7, p(3) = 3/7, p(e1) = 5/7 → ln(7/5)
        assert!((over1[0].pmi - (7.0f64 / 5.0).ln()).abs() < 1e-12);
        assert!(per.iter().flat_map(|(f, o)| f.iter().chain(o)).all(|t| t.pmi.is_finite()));
        // min_count filters rare pairs out of the PMI list only.
        let per = expert_tokens(&ids, &route, 2, 5, 3);
        assert_eq!(per[0].1.len(), 0);
        assert_eq!(per[0].0.len(), 1);
    }

    #[test]
    fn drift_and_chance() {
        assert_eq!(changed(&[0, 1, 2], &[0, 2, 2]), 1);
        assert!((chance_drift(&[1, 1], &[1, 1]) - 0.5).abs() < 1e-12);
        assert!(chance_drift(&[3, 0], &[5, 0]).abs() < 1e-12);
    }
}
