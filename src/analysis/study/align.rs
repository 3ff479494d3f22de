//! The two models' tokens aligned by their character spans (their tokenizers may differ): every
//! pair of tokens of the same source whose byte spans overlap is one aligned pair. Over the pairs,
//! the normalised mutual information of model A's first expert in one layer and model B's in
//! another asks whether the two models cut the text into the same groups, layer by layer.

use serde::{Deserialize, Serialize};

use super::ModelRoutes;
use crate::analysis::metrics::mutual_information;
use crate::rng::Rng;

/// How the two tokenisations line up, and how alike the two models route the aligned tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    pub tokens_a: usize,
    pub tokens_b: usize,
    /// Pairs of overlapping tokens.
    pub pairs: usize,
    /// Share of A's tokens whose span is exactly one of B's.
    pub same_spans: f64,
    /// (A's MoE layers × B's) NMI of the first experts over the aligned pairs.
    pub nmi: Vec<Vec<f64>>,
    /// The largest NMI with B's side shuffled over the pairs (what no shared structure gives).
    pub nmi_chance: f64,
}

/// The aligned pairs (index in A, index in B) of tokens of the same source with overlapping
/// non-empty spans.
pub fn aligned_pairs(a: &ModelRoutes, b: &ModelRoutes) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (ra, rb) = (source_ranges(a), source_ranges(b));
    for (s, &(mut i, ie)) in ra.iter().enumerate() {
        let Some(&(mut j, je)) = rb.get(s) else { break };
        while i < ie && j < je {
            let ((a0, a1), (b0, b1)) = (a.spans[i], b.spans[j]);
            if a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1 {
                out.push((i, j));
            }
            // advance the token that ends first (both when they end together)
            match a1.cmp(&b1) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
            }
        }
    }
    out
}

/// The token range [start, end) of each source, by source index.
fn source_ranges(r: &ModelRoutes) -> Vec<(usize, usize)> {
    let n = r.source.iter().map(|&s| usize::from(s) + 1).max().unwrap_or(0);
    let mut out = vec![(0, 0); n];
    for (t, &s) in r.source.iter().enumerate() {
        let e = &mut out[usize::from(s)];
        if e.1 == 0 {
            e.0 = t;
        }
        e.1 = t + 1;
    }
    out
}

fn nmi_of(a: &ModelRoutes, la: usize, b: &ModelRoutes, lb: usize, pairs: &[(usize, usize)]) -> f64 {
    let (ea, eb) = (a.n_experts[la], b.n_experts[lb]);
    let mut m = vec![vec![0u64; eb.max(1)]; ea.max(1)];
    for &(i, j) in pairs {
        let (Some(&x), Some(&y)) = (a.experts_of(la, i).first(), b.experts_of(lb, j).first()) else {
            continue;
        };
        if let Some(c) = m.get_mut(x as usize).and_then(|r| r.get_mut(y as usize)) {
            *c += 1;
        }
    }
    mutual_information(&m).1
}

/// Aligns `a` and `b` (the same sources in the same order) and measures their routing agreement.
pub fn align(a: &ModelRoutes, b: &ModelRoutes, seed: u64) -> Alignment {
    let pairs = aligned_pairs(a, b);
    let mut b_spans: std::collections::HashSet<(u16, usize, usize)> = std::collections::HashSet::new();
    for j in 0..b.n_tokens() {
        b_spans.insert((b.source[j], b.spans[j].0, b.spans[j].1));
    }
    let same = (0..a.n_tokens())
        .filter(|&i| b_spans.contains(&(a.source[i], a.spans[i].0, a.spans[i].1)))
        .count();
    let nmi: Vec<Vec<f64>> = (0..a.layers.len())
        .map(|la| (0..b.layers.len()).map(|lb| nmi_of(a, la, b, lb, &pairs)).collect())
        .collect();
    let mut shuffled_b: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let mut rng = Rng::new(seed ^ 0xa11e);
    for i in (1..shuffled_b.len()).rev() {
        shuffled_b.swap(i, rng.below(i + 1));
    }
    let shuffled: Vec<(usize, usize)> = pairs.iter().zip(&shuffled_b).map(|(p, &j)| (p.0, j)).collect();
    let nmi_chance = (0..a.layers.len())
        .flat_map(|la| (0..b.layers.len()).map(move |lb| (la, lb)))
        .map(|(la, lb)| nmi_of(a, la, b, lb, &shuffled))
        .fold(0.0, f64::max);
    Alignment {
        tokens_a: a.n_tokens(),
        tokens_b: b.n_tokens(),
        pairs: pairs.len(),
        same_spans: same as f64 / a.n_tokens().max(1) as f64,
        nmi,
        nmi_chance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(spans: &[(usize, usize)], source: &[u16]) -> ModelRoutes {
        ModelRoutes {
            num_layers: 1,
            layers: vec![0],
            n_experts: vec![2],
            k: vec![1],
            ids: vec![0; spans.len()],
            spans: spans.to_vec(),
            source: source.to_vec(),
            experts: vec![(0..spans.len() as u32).map(|t| t % 2).collect()],
            entropy: vec![vec![0.0; spans.len()]],
            ..Default::default()
        }
    }

    #[test]
    fn overlapping_spans_pair_up_within_each_source() {
        // "hello world" cut as [hello][ world] vs [hel][lo][ wor][ld]; then a second source
        let a = routes(&[(0, 5), (5, 11), (0, 3)], &[0, 0, 1]);
        let b = routes(&[(0, 3), (3, 5), (5, 9), (9, 11), (0, 2), (2, 3)], &[0, 0, 0, 0, 1, 1]);
        let p = aligned_pairs(&a, &b);
        assert_eq!(p, vec![(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]);
        let al = align(&a, &b, 1);
        assert_eq!((al.pairs, al.tokens_a, al.tokens_b), (6, 3, 6));
        assert_eq!(al.same_spans, 0.0);
        let same = align(&a, &a, 1);
        assert_eq!(same.same_spans, 1.0);
        assert!((same.nmi[0][0] - 1.0).abs() < 1e-9, "a model agrees with itself: {:?}", same.nmi);
    }
}
