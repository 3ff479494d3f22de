//! The sparse mixture-of-experts block of OLMoE and Mixtral: a softmax router in f32, top-k
//! experts per token (renormalised where the config says so), SwiGLU experts run over the tokens
//! routed to each, and the routing of every token reported to the probe.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// One layer's experts and router.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// Router weight (E, H), in the model's dtype.
    pub router: Tensor,
    /// Gate projections of all experts (E, I, H).
    pub gate: Tensor,
    /// Up projections of all experts (E, I, H).
    pub up: Tensor,
    /// Down projections of all experts (E, H, I).
    pub down: Tensor,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Whether the chosen probabilities are renormalised to sum to one.
    pub norm_topk_prob: bool,
}

/// How one layer routed a run of T tokens (host data, ready for the probe).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Tokens in the run.
    pub tokens: usize,
    /// Experts per token (k).
    pub top_k: usize,
    /// Experts in the layer (E).
    pub num_experts: usize,
    /// Chosen experts (T·k), per token in descending order of probability.
    pub experts: Vec<u32>,
    /// Router probability of each chosen expert (T·k), before any renormalisation.
    pub probs: Vec<f32>,
    /// Mixing weight of each chosen expert (T·k): `probs`, renormalised if the config says so.
    pub weights: Vec<f32>,
    /// Entropy of each token's router distribution over all experts, in nats (T).
    pub entropy: Vec<f32>,
    /// The full router distribution (T·E), softmax in f32.
    pub router_probs: Vec<f32>,
}

impl Routing {
    /// The chosen experts of token `t`, in descending order of probability.
    pub fn experts_of(&self, t: usize) -> &[u32] {
        &self.experts[t * self.top_k..(t + 1) * self.top_k]
    }

    /// The chosen experts of token `t`, sorted ascending (a set, for comparisons).
    pub fn expert_set(&self, t: usize) -> Vec<u32> {
        let mut s = self.experts_of(t).to_vec();
        s.sort_unstable();
        s
    }
}

/// Top-k and entropy of each row of a (T, E) probability table, on the host.
pub fn route(router_probs: Vec<f32>, num_experts: usize, top_k: usize, norm_topk_prob: bool) -> Routing {
    let tokens = router_probs.len() / num_experts.max(1);
    let mut r = Routing {
        tokens,
        top_k,
        num_experts,
        experts: Vec::with_capacity(tokens * top_k),
        probs: Vec::with_capacity(tokens * top_k),
        weights: Vec::with_capacity(tokens * top_k),
        entropy: Vec::with_capacity(tokens),
        router_probs: Vec::new(),
    };
    let mut order: Vec<u32> = (0..num_experts as u32).collect();
    for row in router_probs.chunks_exact(num_experts) {
        order.sort_unstable_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
        let chosen = &order[..top_k];
        let sum: f32 = chosen.iter().map(|&e| row[e as usize]).sum();
        for &e in chosen {
            let p = row[e as usize];
            r.experts.push(e);
            r.probs.push(p);
            r.weights.push(if norm_topk_prob { p / sum } else { p });
        }
        let h: f32 = row.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
        r.entropy.push(h);
    }
    r.router_probs = router_probs;
    r
}

impl SparseMoe {
    /// Experts in the layer.
    pub fn num_experts(&self) -> usize {
        self.router.dims()[0]
    }

    /// Runs the block over `x` (T, H) and returns its output (T, H) with the routing.
    ///
    /// As transformers does: router logits in the model's dtype, softmax in f32, each expert's
    /// output times its f32 weight cast back to the model's dtype and added in expert order.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let e_count = self.num_experts();
        let logits = x.matmul(&self.router.t()?)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let routing = route(probs.flatten_all()?.to_vec1::<f32>()?, e_count, self.top_k, self.norm_topk_prob);

        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e_count];
        for t in 0..routing.tokens {
            for j in 0..self.top_k {
                let i = t * self.top_k + j;
                let slot = &mut per_expert[routing.experts[i] as usize];
                slot.0.push(t as u32);
                slot.1.push(routing.weights[i]);
            }
        }
        let dtype = x.dtype();
        let mut out = x.zeros_like()?;
        for (e, (tokens, weights)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, x.device())?;
            let w = Tensor::from_vec(weights, (n, 1), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let g = xs.matmul(&self.gate.get(e)?.t()?)?;
            let u = xs.matmul(&self.up.get(e)?.t()?)?;
            let h = (candle_nn::ops::silu(&g)? * u)?;
            let y = h.matmul(&self.down.get(e)?.t()?)?;
            let y = y.to_dtype(DType::F32)?.broadcast_mul(&w)?.to_dtype(dtype)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        Ok((out, routing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_the_largest_and_renormalises_on_request() {
        let probs = vec![0.1, 0.5, 0.15, 0.25, 0.7, 0.1, 0.1, 0.1];
        let r = route(probs.clone(), 4, 2, false);
        assert_eq!(r.experts, vec![1, 3, 0, 1]);
        assert_eq!(r.weights, vec![0.5, 0.25, 0.7, 0.1]);
        assert_eq!(r.expert_set(1), vec![0, 1]);
        let n = route(probs, 4, 2, true);
        assert!((n.weights[0] - 0.5 / 0.75).abs() < 1e-6 && (n.weights[1] - 0.25 / 0.75).abs() < 1e-6);
        let uniform = route(vec![0.25; 4], 4, 1, false);
        assert!((uniform.entropy[0] - 4f32.ln()).abs() < 1e-6);
    }
}
