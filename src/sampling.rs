//! Next-token sampling: repetition penalty, then greedy or temperature with top-k, top-p and min-p
//! filters, drawn from a seeded generator (same seed, same text).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Sampling settings; `temperature` 0 means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f64,
    /// Drop tokens below min_p × the top probability (0 = off).
    pub min_p: f64,
    /// > 1 discourages tokens seen in the last `repeat_last_n` (1 = off).
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    pub max_tokens: usize,
    /// Generation stops when the text ends with one of these (the stop text is not emitted).
    pub stop: Vec<String>,
    /// Keep generating past end-of-text (benchmarks: a fixed token count).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
            max_tokens: 256,
            stop: vec![],
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the parameter and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, v: String, range: &str| Err(Error::Invalid(format!("{name} = {v} is out of range; use {range}")));
        if !(0.0..=100.0).contains(&self.temperature) || self.temperature.is_nan() {
            return bad("temperature", self.temperature.to_string(), "0 (greedy) to 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p.to_string(), "a value in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p.to_string(), "a value in [0, 1)");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad("repeat-penalty", self.repeat_penalty.to_string(), "a positive number (1 = off)");
        }
        Ok(())
    }
}

/// Draws tokens from logits with a fixed parameter set and its own generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// The state of the sampler's generator (see [`crate::rng::Rng::state`]).
    pub fn rng_state(&self) -> u64 {
        self.rng.state()
    }

    /// Puts the generator at `state` (after a device sampler drew from it).
    pub fn set_rng_state(&mut self, state: u64) {
        self.rng = Rng::from_state(state);
    }

    /// Picks the next token from `logits` (V), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut l: Vec<f32> = logits.to_vec();
        if (p.repeat_penalty - 1.0).abs() > f32::EPSILON {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let (true, Some(x)) = (seen.insert(t), l.get_mut(t as usize)) {
                    *x = if *x >= 0.0 { *x / p.repeat_penalty } else { *x * p.repeat_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&l);
        }
        // Candidates, cut down in linear time before anything is sorted: top-k by selection,
        // min-p in logit space (p_i ≥ min_p·p_max  ⟺  l_i ≥ l_max + T·ln min_p).
        let mut idx: Vec<u32> = (0..l.len() as u32).filter(|&i| l[i as usize].is_finite()).collect();
        if idx.is_empty() {
            return argmax(&l);
        }
        let desc = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]);
        if p.top_k > 0 && idx.len() > p.top_k {
            idx.select_nth_unstable_by(p.top_k - 1, desc);
            idx.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            let lmax = idx.iter().map(|&i| l[i as usize]).fold(f32::NEG_INFINITY, f32::max);
            let cut = lmax + (p.temperature * p.min_p.ln()) as f32;
            idx.retain(|&i| l[i as usize] >= cut);
        }
        idx.sort_unstable_by(desc);
        let t = p.temperature as f32;
        let top = l[idx[0] as usize] / t;
        let mut probs: Vec<f64> = idx.iter().map(|&i| f64::from((l[i as usize] / t - top).exp())).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (k, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = k + 1;
                    break;
                }
            }
            idx.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.uniform() * total;
        for (k, &x) in probs.iter().enumerate() {
            r -= x;
            if r < 0.0 {
                return idx[k];
            }
        }
        idx[idx.len() - 1]
    }
}

/// Index of the largest value (first on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best as u32
}
