//! Sinkhorn balancing of top-1 routes (SPEC §3, "Training-time routing").
//!
//! Given router logits C (T tokens × E experts), find d0 (T) and d1 (E) so that the plan
//! diag(d0)·K·diag(d1) has row sums 1/T and column sums 1/E, then route each token to the argmax of
//! its row. Two variants:
//! * [`Variant::Zyphra`] (the released code's `sinkhorn`): K = exp(2C), d1 starts at
//!   1/(E·column sums of K);
//! * [`Variant::Standard`] (upstream Megatron): K = exp(C), d1 starts at 1.
//!
//! Both iterate d0 = 1/(T·(K d1 + ε)), d1 = 1/(E·(Kᵀ d0 + ε)) until mean|Δd1| ≤ tol. The
//! reference loop has no cap; ours stops at `max_iters` and says whether it converged. Computed on
//! the host in f64 (T×E is small), returned in f32.

use serde::{Deserialize, Serialize};

/// Which Sinkhorn to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// exp(2C), d1₀ = 1/(E·colsum): the BlackMamba code's variant.
    #[default]
    Zyphra,
    /// exp(C), d1₀ = 1: the textbook / Megatron variant.
    Standard,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Zyphra => "zyphra",
            Self::Standard => "standard",
        }
    }
}

/// Options of a Sinkhorn run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SinkhornOpts {
    pub variant: Variant,
    pub max_iters: usize,
    /// Stop when mean|d1 − d1_prev| ≤ tol (absolute, as the reference).
    pub tol: f64,
}

impl Default for SinkhornOpts {
    fn default() -> Self {
        Self {
            variant: Variant::Zyphra,
            max_iters: 1000,
            tol: 1e-4,
        }
    }
}

/// One iteration's convergence measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SinkhornIter {
    /// mean|d1 − d1_prev| (the reference's stopping quantity)
    pub abs_change: f64,
    /// abs_change / mean|d1|
    pub rel_change: f64,
    /// max over tokens of |row sum − 1/T|, scaled by T (0 = balanced)
    pub row_err: f64,
    /// max over experts of |column sum − 1/E|, scaled by E
    pub col_err: f64,
}

/// The result of a Sinkhorn run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkhornResult {
    pub n_tokens: usize,
    pub n_experts: usize,
    /// (T, E) diag(d0)·K·diag(d1)
    pub plan: Vec<f32>,
    /// (T) argmax of each row of the plan
    pub assignment: Vec<u32>,
    /// One entry per pass of the loop.
    pub trace: Vec<SinkhornIter>,
    pub converged: bool,
}

impl SinkhornResult {
    pub fn iters(&self) -> usize {
        self.trace.len()
    }
}

/// Runs Sinkhorn on `cost` (T×E, row-major). T or E of 0 gives an empty result.
pub fn sinkhorn(cost: &[f32], n_tokens: usize, n_experts: usize, opts: &SinkhornOpts) -> SinkhornResult {
    let (t, e) = (n_tokens, n_experts);
    debug_assert_eq!(cost.len(), t * e);
    if t == 0 || e == 0 {
        return SinkhornResult {
            n_tokens: t,
            n_experts: e,
            plan: vec![],
            assignment: vec![],
            trace: vec![],
            converged: true,
        };
    }
    let scale = match opts.variant {
        Variant::Zyphra => 2.0,
        Variant::Standard => 1.0,
    };
    let k: Vec<f64> = cost.iter().map(|&c| (scale * f64::from(c)).exp()).collect();
    let (tf, ef) = (t as f64, e as f64);
    const EPS: f64 = 1e-8;
    let mut d0 = vec![1.0f64; t];
    // column sums walk the tokens in order for every expert at once (the same sums, in the same
    // order, as one pass per column, with e independent chains)
    let mut col = vec![0f64; e];
    let mut d1: Vec<f64> = match opts.variant {
        Variant::Zyphra => {
            for row in k.chunks_exact(e) {
                col.iter_mut().zip(row).for_each(|(c, &x)| *c += x);
            }
            col.iter().map(|&c| 1.0 / (ef * c)).collect()
        }
        Variant::Standard => vec![1.0; e],
    };
    let mut trace = Vec::new();
    let mut converged = false;
    while trace.len() < opts.max_iters {
        let prev = d1.clone();
        col.iter_mut().for_each(|c| *c = 0.0);
        for (i, row) in k.chunks_exact(e).enumerate() {
            let s: f64 = row.iter().zip(&d1).map(|(x, d)| x * d).sum();
            d0[i] = 1.0 / (tf * (s + EPS));
            col.iter_mut().zip(row).for_each(|(c, &x)| *c += x * d0[i]);
        }
        for (d, &c) in d1.iter_mut().zip(&col) {
            *d = 1.0 / (ef * (c + EPS));
        }
        let abs_change = d1.iter().zip(&prev).map(|(a, b)| (a - b).abs()).sum::<f64>() / ef;
        let mean_d1 = d1.iter().map(|x| x.abs()).sum::<f64>() / ef;
        let (row_err, col_err) = marginal_errors(&k, &d0, &d1, t, e);
        trace.push(SinkhornIter {
            abs_change,
            rel_change: abs_change / mean_d1.max(f64::MIN_POSITIVE),
            row_err,
            col_err,
        });
        if abs_change <= opts.tol {
            converged = true;
            break;
        }
    }
    let mut plan = vec![0f32; t * e];
    let mut assignment = vec![0u32; t];
    for i in 0..t {
        let mut best = (0usize, f64::NEG_INFINITY);
        for j in 0..e {
            let p = d0[i] * k[i * e + j] * d1[j];
            plan[i * e + j] = p as f32;
            if p > best.1 {
                best = (j, p);
            }
        }
        assignment[i] = best.0 as u32;
    }
    SinkhornResult {
        n_tokens: t,
        n_experts: e,
        plan,
        assignment,
        trace,
        converged,
    }
}

fn marginal_errors(k: &[f64], d0: &[f64], d1: &[f64], t: usize, e: usize) -> (f64, f64) {
    let mut col = vec![0f64; e];
    let mut row_err = 0f64;
    for i in 0..t {
        let mut r = 0f64;
        for j in 0..e {
            let p = d0[i] * k[i * e + j] * d1[j];
            r += p;
            col[j] += p;
        }
        row_err = row_err.max((r - 1.0 / t as f64).abs() * t as f64);
    }
    let col_err = col.iter().map(|c| (c - 1.0 / e as f64).abs() * e as f64).fold(0f64, f64::max);
    (row_err, col_err)
}

/// The greedy top-1 route of each token (argmax of its logits; first on ties).
pub fn greedy(cost: &[f32], n_tokens: usize, n_experts: usize) -> Vec<u32> {
    (0..n_tokens)
        .map(|i| {
            let row = &cost[i * n_experts..(i + 1) * n_experts];
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            best as u32
        })
        .collect()
}

/// Tokens per expert of an assignment.
pub fn loads(assignment: &[u32], n_experts: usize) -> Vec<usize> {
    let mut l = vec![0; n_experts];
    for &a in assignment {
        if let Some(x) = l.get_mut(a as usize) {
            *x += 1;
        }
    }
    l
}
