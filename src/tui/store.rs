//! Telemetry the UI keeps: every token the model read, by position, with its routing and state
//! norms, plus the balance statistics the routing view shows. Bounded: the oldest tokens go first.

use crate::engine::protocol::TokenRec;

/// The most tokens kept for the views.
pub const MAX_TOKENS: usize = 100_000;

/// Tokens by position (ascending).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub tokens: std::collections::VecDeque<TokenRec>,
}

impl Telemetry {
    pub fn push(&mut self, rec: TokenRec) {
        // positions only grow; a repeated position replaces the tail from there
        while self.tokens.back().is_some_and(|t| t.pos >= rec.pos) {
            self.tokens.pop_back();
        }
        self.tokens.push_back(rec);
        while self.tokens.len() > MAX_TOKENS {
            self.tokens.pop_front();
        }
    }

    /// Drops every token at `pos` or later.
    pub fn truncate(&mut self, pos: usize) {
        while self.tokens.back().is_some_and(|t| t.pos >= pos) {
            self.tokens.pop_back();
        }
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token at position `pos`.
    pub fn at_pos(&self, pos: usize) -> Option<&TokenRec> {
        let (a, b) = self.tokens.as_slices();
        let find = |s: &[TokenRec]| s.binary_search_by_key(&pos, |t| t.pos).ok();
        match find(a) {
            Some(i) => a.get(i),
            None => find(b).and_then(|i| b.get(i)),
        }
    }

    /// The expert of the token at `pos` in MoE slot `slot`.
    pub fn expert_at(&self, pos: usize, slot: usize) -> Option<usize> {
        self.at_pos(pos)
            .and_then(|t| t.routes.get(slot))
            .filter(|r| r.prob.is_finite())
            .map(|r| usize::from(r.expert))
    }
}

/// Balance of one MoE layer over the tokens with telemetry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Balance {
    pub loads: Vec<usize>,
    pub tokens: usize,
    /// Coefficient of variation of the loads (0 = perfectly even).
    pub cv: f64,
    /// Entropy of the load distribution divided by ln E (1 = even).
    pub entropy: f64,
    /// Share of the busiest expert.
    pub busiest: f64,
    /// Share of consecutive token pairs that keep the same expert.
    pub stickiness: f64,
}

/// Balance of MoE slot `slot` with `n_experts` experts.
pub fn balance(tele: &Telemetry, slot: usize, n_experts: usize) -> Balance {
    let mut loads = vec![0usize; n_experts.max(1)];
    let (mut same, mut pairs) = (0usize, 0usize);
    let mut prev: Option<(usize, usize)> = None; // (pos, expert)
    for t in &tele.tokens {
        let Some(r) = t.routes.get(slot).filter(|r| r.prob.is_finite()) else {
            prev = None;
            continue;
        };
        let e = usize::from(r.expert);
        if let Some(l) = loads.get_mut(e) {
            *l += 1;
        }
        // a top-k model: the other chosen experts carry load too
        for &(x, _) in t.more.get(slot).map_or(&[][..], Vec::as_slice) {
            if let Some(l) = loads.get_mut(usize::from(x)) {
                *l += 1;
            }
        }
        if let Some((p, pe)) = prev {
            if p + 1 == t.pos {
                pairs += 1;
                same += usize::from(pe == e);
            }
        }
        prev = Some((t.pos, e));
    }
    let n: usize = loads.iter().sum();
    if n == 0 {
        return Balance {
            loads,
            ..Default::default()
        };
    }
    let k = loads.len() as f64;
    let mean = n as f64 / k;
    let var = loads.iter().map(|&l| (l as f64 - mean).powi(2)).sum::<f64>() / k;
    let h: f64 = loads
        .iter()
        .filter(|&&l| l > 0)
        .map(|&l| {
            let p = l as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    Balance {
        cv: var.sqrt() / mean,
        entropy: if k > 1.0 { h / k.ln() } else { 1.0 },
        busiest: loads.iter().copied().max().unwrap_or(0) as f64 / n as f64,
        stickiness: if pairs > 0 { same as f64 / pairs as f64 } else { 0.0 },
        tokens: n,
        loads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::Route;

    fn tok(pos: usize, e: u16) -> TokenRec {
        TokenRec {
            pos,
            routes: vec![Route { expert: e, prob: 0.5 }],
            ..Default::default()
        }
    }

    #[test]
    fn balance_of_even_and_skewed_loads() {
        let mut t = Telemetry::default();
        for (i, e) in [0u16, 1, 2, 3].into_iter().enumerate() {
            t.push(tok(i, e));
        }
        let b = balance(&t, 0, 4);
        assert!(b.cv.abs() < 1e-12 && (b.entropy - 1.0).abs() < 1e-12 && (b.busiest - 0.25).abs() < 1e-12);
        assert_eq!(b.stickiness, 0.0);
        let mut t = Telemetry::default();
        for i in 0..4 {
            t.push(tok(i, 2));
        }
        let b = balance(&t, 0, 4);
        assert_eq!((b.busiest, b.stickiness, b.entropy), (1.0, 1.0, 0.0));
        assert!((b.cv - 3f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn push_replaces_from_a_repeated_position_and_truncate_cuts() {
        let mut t = Telemetry::default();
        for i in 0..5 {
            t.push(tok(i, 0));
        }
        t.push(tok(3, 1));
        assert_eq!(t.len(), 4);
        assert_eq!(t.expert_at(3, 0), Some(1));
        t.truncate(2);
        assert_eq!(t.len(), 2);
        assert!(t.at_pos(2).is_none() && t.at_pos(1).is_some());
    }
}
