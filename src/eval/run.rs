//! Scoring a task: few-shot prompts drawn reproducibly, every request through the
//! log-likelihood primitive, and lm-eval's metrics with their standard errors.
//!
//! * acc: the choice with the highest summed log-prob is the gold one (first on ties, as
//!   `np.argmax`); acc_norm: the same after dividing by the choice's length in characters.
//! * WinoGrande (partial scoring): acc over the options' contexts.
//! * LAMBADA: acc = the last word is the greedy continuation; perplexity = exp(−mean log-prob).
//! * stderr of a mean: sample standard deviation (n − 1) / √n, as lm-eval's `mean_stderr`;
//!   perplexity's by bootstrap ([`BOOTSTRAP_ITERS`] resamples).

use std::time::Instant;

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::eval::data::TaskData;
use crate::eval::scorer::{encode_pair, loglikelihood, loglikelihood_full, Scorer};
use crate::eval::tasks::{fewshot_prefix, Doc};
use crate::rng::Rng;

/// Resamples of the perplexity's bootstrap standard error.
pub const BOOTSTRAP_ITERS: usize = 1000;

/// How a task is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOpts {
    /// Few-shot examples before each document.
    pub shots: usize,
    /// Score only the first N documents.
    pub limit: Option<usize>,
    /// Seed of the few-shot draw (and the bootstrap).
    pub seed: u64,
    /// Read each context once and share its state among the choices (off: every pair from scratch).
    pub reuse_state: bool,
}

/// One number of a task, labelled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    /// acc, acc_norm or perplexity
    pub metric: &'static str,
    pub value: f64,
    /// Standard error (none for fewer than two documents).
    pub stderr: Option<f64>,
}

/// The result of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskReport {
    pub task: &'static str,
    pub split: String,
    pub shots: usize,
    /// Where the few-shot examples came from: a split, or `"<split> (other documents)"`.
    pub fewshot_from: String,
    pub docs: usize,
    pub metrics: Vec<Metric>,
    pub seconds: f64,
    pub docs_per_s: f64,
    /// Tokens read by the model (contexts once each with state reuse, plus continuations).
    pub tokens_per_s: f64,
    pub state_reuse: bool,
}

/// Scores `data` with `s`; `eot` stands for an empty context; `progress(done, total)` after each
/// document.
pub fn evaluate<S: Scorer>(
    s: &S,
    tok: &Tokenizer,
    eot: u32,
    data: &TaskData,
    opts: &EvalOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskReport> {
    let n = opts.limit.map_or(data.docs.len(), |l| l.min(data.docs.len()));
    let docs = &data.docs[..n];
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut acc = Vec::with_capacity(n);
    let mut acc_norm = Vec::with_capacity(n);
    let mut cloze_ll = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let examples = draw_fewshot(data, i, opts.shots, opts.seed)?;
        let prefix = fewshot_prefix(&examples);
        let mut lls = Vec::with_capacity(doc.n_choices());
        for r in doc.requests(&prefix) {
            let (ctx, conts) = encode_pair(tok, eot, &r.context, &r.continuations)?;
            let scores = match opts.reuse_state {
                true => loglikelihood(s, &ctx, &conts)?,
                false => loglikelihood_full(s, &ctx, &conts)?,
            };
            let cont_tokens: usize = conts.iter().map(Vec::len).sum();
            tokens += cont_tokens + if opts.reuse_state { ctx.len() } else { ctx.len() * conts.len() };
            lls.extend(scores);
        }
        match doc {
            Doc::Choice { choices, gold, .. } => {
                let ll: Vec<f64> = lls.iter().map(|l| l.logprob).collect();
                let norm: Vec<f64> = ll.iter().zip(choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
                acc.push(f64::from(u8::from(argmax(&ll) == *gold)));
                acc_norm.push(f64::from(u8::from(argmax(&norm) == *gold)));
            }
            Doc::Partial { gold, .. } => {
                let ll: Vec<f64> = lls.iter().map(|l| l.logprob).collect();
                acc.push(f64::from(u8::from(argmax(&ll) == *gold)));
            }
            Doc::Cloze { .. } => {
                let l = lls
                    .first()
                    .ok_or_else(|| Error::Invalid("a cloze document produced no score".into()))?;
                acc.push(f64::from(u8::from(l.greedy)));
                cloze_ll.push(l.logprob);
            }
        }
        progress(i + 1, n);
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut metrics = Vec::new();
    if !cloze_ll.is_empty() {
        metrics.push(Metric {
            metric: "perplexity",
            value: perplexity(&cloze_ll),
            stderr: bootstrap_stderr(&cloze_ll, perplexity, BOOTSTRAP_ITERS, opts.seed),
        });
    }
    metrics.push(Metric {
        metric: "acc",
        value: mean(&acc),
        stderr: mean_stderr(&acc),
    });
    if !acc_norm.is_empty() {
        metrics.push(Metric {
            metric: "acc_norm",
            value: mean(&acc_norm),
            stderr: mean_stderr(&acc_norm),
        });
    }
    let fewshot_from = match &data.fewshot {
        Some((split, _)) => split.clone(),
        None => format!("{} (other documents)", data.split),
    };
    Ok(TaskReport {
        task: data.task.name(),
        split: data.split.clone(),
        shots: opts.shots,
        fewshot_from,
        docs: n,
        metrics,
        seconds: secs,
        docs_per_s: rate(n, secs),
        tokens_per_s: rate(tokens, secs),
        state_reuse: opts.reuse_state,
    })
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// The `shots` few-shot examples of document `i`: distinct documents of the few-shot split, or
/// of the scored split other than `i`, drawn with a generator seeded by (`seed`, `i`) so that a
/// document's prompt does not depend on `--limit` or on the documents before it.
pub fn draw_fewshot(data: &TaskData, i: usize, shots: usize, seed: u64) -> Result<Vec<&Doc>> {
    if shots == 0 {
        return Ok(Vec::new());
    }
    let (pool, skip) = match &data.fewshot {
        Some((_, docs)) => (docs.as_slice(), None),
        None => (data.docs.as_slice(), Some(i)),
    };
    let avail = pool.len() - usize::from(skip.is_some());
    if avail < shots {
        return Err(Error::Invalid(format!(
            "--shots {shots}: {} has only {avail} documents to draw examples from",
            data.task.name()
        )));
    }
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut picked: Vec<usize> = Vec::with_capacity(shots);
    while picked.len() < shots {
        let j = rng.below(pool.len());
        if Some(j) != skip && !picked.contains(&j) {
            picked.push(j);
        }
    }
    Ok(picked.into_iter().map(|j| &pool[j]).collect())
}

/// Index of the largest value, the first on ties (NaN never wins).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The arithmetic mean (0 for none).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// lm-eval's `mean_stderr`: sample standard deviation (n − 1) over √n; none below two values.
pub fn mean_stderr(v: &[f64]) -> Option<f64> {
    let n = v.len();
    if n < 2 {
        return None;
    }
    let mu = mean(v);
    let var = v.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// lm-eval's `perplexity` aggregation: exp(−mean log-likelihood).
pub fn perplexity(ll: &[f64]) -> f64 {
    (-mean(ll)).exp()
}

/// Bootstrap standard error of `stat` over `v`: the sample standard deviation of `stat` on
/// `iters` resamples with replacement.
pub fn bootstrap_stderr(v: &[f64], stat: fn(&[f64]) -> f64, iters: usize, seed: u64) -> Option<f64> {
    if v.len() < 2 || iters < 2 {
        return None;
    }
    let mut rng = Rng::new(seed);
    let mut sample = vec![0.0; v.len()];
    let stats: Vec<f64> = (0..iters)
        .map(|_| {
            for x in sample.iter_mut() {
                *x = v[rng.below(v.len())];
            }
            stat(&sample)
        })
        .collect();
    let mu = mean(&stats);
    Some((stats.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (iters - 1) as f64).sqrt())
}
