//! The TUI's compare view, engine side (issues 19 and 22): one text run through the chat's model
//! (A) and a second one (B) — any model the picker offers, of any family, or the same model in
//! another weight format — and their routes set side by side, token by token.
//!
//! Both models read the text teacher-forced from a fresh state through the study's
//! [`collect_routes_of`]; their tokens pair up one to one when the two tokenisations are the same
//! and by overlapping character spans otherwise ([`aligned_pairs`]). Per MoE layer of A (matched
//! to B's layer of the same relative depth when the depths differ) the report gives the routing
//! flips (pairs whose first expert differs), for top-k models the mean Jaccard overlap of the two
//! expert sets, the NMI of the first experts over the pairs (what still means something when the
//! two models' expert ids name different experts) and each side's load balance (CV).

use tokenizers::Tokenizer;

use super::protocol::{CompareWith, EngineEvent, LoadSpec};
use super::{load, Chat, Worker};
use crate::analysis::metrics::cv;
use crate::analysis::study::align::{align, aligned_pairs};
use crate::analysis::study::{collect_routes_of, Labelled, ModelRoutes, Source};
use crate::error::{Error, Result};
use crate::lm::AnyModel;
use crate::model::Model;

/// The text compared when the chat is empty.
pub const DEFAULT_TEXT: &str = "The harbour was quiet before dawn. A fisherman checked his nets while the gulls \
waited on the wall, and somewhere up the hill a baker lit the ovens. By seven the market had opened: \
apples, bread, cheap radios and a man who swore his knives would never need sharpening.";

/// Tokens of the text each model reads at most (the rest is cut).
pub const MAX_TOKENS: usize = 2048;

/// One model of a comparison: its tokens and routes.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareSide {
    pub label: String,
    /// `blackmamba`, `olmoe` or `mixtral`.
    pub family: String,
    /// The weight format: the dtype of a dense model (`f32`, `bf16`), else `int8`, `fp8`, `q4g64`…
    pub format: String,
    /// The text of each token (its character span; `·` where the span cuts a character).
    pub pieces: Vec<String>,
    /// Layer index of each MoE layer.
    pub layers: Vec<usize>,
    /// Experts of each MoE layer.
    pub n_experts: Vec<usize>,
    /// Experts per token of each MoE layer.
    pub k: Vec<usize>,
    /// Per MoE layer, (tokens × k) chosen experts, best first.
    pub experts: Vec<Vec<u16>>,
    /// Per MoE layer, the coefficient of variation of the expert loads (every choice counted).
    pub cv: Vec<f64>,
}

impl CompareSide {
    /// The experts of token `t` in MoE layer `m`, best first.
    pub fn experts_of(&self, m: usize, t: usize) -> &[u16] {
        let k = self.k.get(m).copied().unwrap_or(1);
        self.experts.get(m).and_then(|e| e.get(t * k..(t + 1) * k)).unwrap_or(&[])
    }
}

/// One MoE layer of A against the matching layer of B.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFlips {
    /// MoE slots (index into the sides' `layers`).
    pub slot_a: usize,
    pub slot_b: usize,
    /// Aligned token pairs compared.
    pub pairs: usize,
    /// Pairs whose first expert differs.
    pub flips: usize,
    /// Mean Jaccard overlap of the two expert sets over the pairs (when either model is top-k).
    pub jaccard: Option<f64>,
    /// Normalised mutual information of the two first experts over the pairs.
    pub nmi: f64,
}

impl LayerFlips {
    /// The share of pairs whose first expert differs.
    pub fn flip_share(&self) -> f64 {
        self.flips as f64 / self.pairs.max(1) as f64
    }
}

/// The comparison the compare view draws.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareReport {
    pub a: CompareSide,
    pub b: CompareSide,
    /// B is A's model in another weight format.
    pub same_model: bool,
    /// Both read the same tokens (pairs are token by token); otherwise aligned by spans.
    pub same_tokens: bool,
    /// Aligned (token of A, token of B) pairs, in text order.
    pub pairs: Vec<(usize, usize)>,
    /// One per MoE layer of A.
    pub layers: Vec<LayerFlips>,
}

impl CompareReport {
    /// Both sides have the same MoE layers with the same experts (one architecture): expert ids
    /// name the same experts, so a flip is a token sent elsewhere.
    pub fn same_experts(&self) -> bool {
        self.a.layers == self.b.layers && self.a.n_experts == self.b.n_experts
    }

    /// The first token of B aligned with token `t` of A.
    pub fn partner(&self, t: usize) -> Option<usize> {
        let i = self.pairs.partition_point(|p| p.0 < t);
        self.pairs.get(i).filter(|p| p.0 == t).map(|p| p.1)
    }
}

/// The MoE slot of B at the relative depth of A's slot `i` of `na` (the same slot when the counts
/// agree).
pub fn matching_slot(i: usize, na: usize, nb: usize) -> usize {
    if na == nb || nb <= 1 {
        return i.min(nb.saturating_sub(1));
    }
    let x = i as f64 * (nb - 1) as f64 / (na.max(2) - 1) as f64;
    (x.round() as usize).min(nb - 1)
}

fn side(r: &ModelRoutes, text: &str, format: String) -> CompareSide {
    let pieces = r.spans.iter().map(|&(s, e)| text.get(s..e).unwrap_or("·").to_string()).collect();
    let experts: Vec<Vec<u16>> = r
        .experts
        .iter()
        .map(|l| l.iter().map(|&e| u16::try_from(e).unwrap_or(u16::MAX)).collect())
        .collect();
    let cv = (0..r.layers.len())
        .map(|m| {
            let mut loads = vec![0u64; r.n_experts[m]];
            for &e in &r.experts[m] {
                if let Some(c) = loads.get_mut(e as usize) {
                    *c += 1;
                }
            }
            cv(&loads)
        })
        .collect();
    CompareSide {
        label: r.label.clone(),
        family: r.family.clone(),
        format,
        pieces,
        layers: r.layers.clone(),
        n_experts: r.n_experts.clone(),
        k: r.k.clone(),
        experts,
        cv,
    }
}

/// Sets two models' routes over `text` side by side (the pure part of a comparison).
pub fn build_report(a: &ModelRoutes, b: &ModelRoutes, text: &str, formats: (String, String), same_model: bool) -> CompareReport {
    let same_tokens = a.ids == b.ids;
    let pairs: Vec<(usize, usize)> = if same_tokens {
        (0..a.n_tokens()).map(|t| (t, t)).collect()
    } else {
        aligned_pairs(a, b)
    };
    let nmi = align(a, b, 0).nmi;
    let (na, nb) = (a.layers.len(), b.layers.len());
    let layers = (0..na)
        .map(|ma| {
            let mb = matching_slot(ma, na, nb);
            let topk = a.k[ma] > 1 || b.k[mb] > 1;
            let (mut flips, mut jac) = (0, 0.0);
            for &(i, j) in &pairs {
                let (sa, sb) = (a.experts_of(ma, i), b.experts_of(mb, j));
                if sa.first() != sb.first() {
                    flips += 1;
                }
                let inter = sa.iter().filter(|e| sb.contains(e)).count();
                let union = sa.len() + sb.len() - inter;
                jac += inter as f64 / union.max(1) as f64;
            }
            LayerFlips {
                slot_a: ma,
                slot_b: mb,
                pairs: pairs.len(),
                flips,
                jaccard: topk.then(|| jac / pairs.len().max(1) as f64),
                nmi: nmi.get(ma).and_then(|r| r.get(mb)).copied().unwrap_or(0.0),
            }
        })
        .collect();
    CompareReport {
        a: side(a, text, formats.0),
        b: side(b, text, formats.1),
        same_model,
        same_tokens,
        pairs,
        layers,
    }
}

/// The weight format of a model: its quantisation, else its dtype.
fn format_of(m: &AnyModel) -> Result<String> {
    if let AnyModel::BlackMamba(bm) = m {
        let mut probe = Model::clone(bm);
        if let Some(f) = crate::quant::apply::model_format(&mut probe)? {
            return Ok(f.name());
        }
    }
    Ok(format!("{:?}", m.dtype()).to_lowercase())
}

/// Model B, its tokenizer and label, for a comparison with the chat's model `a`.
fn model_b(
    w: &Worker,
    a: &AnyModel,
    with: &CompareWith,
    emit: &mut dyn FnMut(EngineEvent),
) -> Result<(AnyModel, Option<Tokenizer>, String)> {
    match with {
        CompareWith::Model(spec) => {
            let l = load(spec, &w.opts, emit)?;
            Ok((l.model, Some(l.tokenizer), l.label))
        }
        CompareWith::Format(q) => {
            let AnyModel::BlackMamba(bm) = a else {
                return Err(Error::Invalid(format!(
                    "comparing weight formats works on BlackMamba models; {} is a {} checkpoint (pick a model to compare with instead)",
                    w.label,
                    a.family()
                )));
            };
            let mut base = Model::clone(bm);
            let current = crate::quant::apply::model_format(&mut base)?;
            if current.is_some() {
                // the dense weights are gone from a quantised model: load them again
                let Some(spec) = w.spec.as_ref().filter(|s| s.quant.is_some()) else {
                    return Err(Error::Invalid(format!(
                        "{} was loaded quantised and its dense weights are not at hand; load the model without a format in the picker (Ctrl-K) and compare from there",
                        w.label
                    )));
                };
                let dense = LoadSpec {
                    quant: None,
                    ..spec.clone()
                };
                let l = load(&dense, &w.opts, emit)?;
                let AnyModel::BlackMamba(m) = l.model else {
                    return Err(Error::Invalid(format!("{}: reloading gave another family", l.label)));
                };
                base = *m;
            }
            match q {
                Some(q) if current == Some(q.format) => Err(Error::Invalid(format!(
                    "{} is already {}; pick another format to compare with",
                    w.label, q.format
                ))),
                Some(q) => {
                    crate::quant::apply::quantize_model(&mut base, q)?;
                    let label = base_label(&w.label);
                    Ok((AnyModel::BlackMamba(Box::new(base)), None, format!("{label} [{}]", q.format)))
                }
                None if current.is_none() => Err(Error::Invalid(format!(
                    "{} is already dense; pick a weight format (int8, fp8, q4, q4g128) to compare with",
                    w.label
                ))),
                None => Ok((AnyModel::BlackMamba(Box::new(base)), None, base_label(&w.label).to_string())),
            }
        }
    }
}

/// A label without its ` [format]` suffix.
fn base_label(label: &str) -> &str {
    match label.rfind(" [") {
        Some(i) if label.ends_with(']') => &label[..i],
        _ => label,
    }
}

/// Runs `text` (or [`DEFAULT_TEXT`] when it is blank) through the chat's model and model B and
/// emits [`EngineEvent::Compare`].
pub(super) fn run(w: &Worker, text: &str, with: &CompareWith, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
    let text = if text.trim().is_empty() { DEFAULT_TEXT } else { text };
    let a = match &w.chat {
        Chat::Mamba { model, ft, .. } => AnyModel::BlackMamba(Box::new(ft.chat_model().unwrap_or(model).clone())),
        Chat::Moe { model, .. } => AnyModel::Transformer(model.clone()),
    };
    let (b, tok_b, label_b) = model_b(w, &a, with, emit)?;
    let sources = [Source {
        name: "chat".into(),
        text: text.to_string(),
    }];
    let routes = |m: &AnyModel, tok: &Tokenizer, label: &str| {
        let who = Labelled {
            model: m,
            tokenizer: tok,
            label,
            untrained: false,
        };
        collect_routes_of(who, &sources, 256, MAX_TOKENS, &mut |_| {})
    };
    let ra = routes(&a, &w.tok, &w.label)?;
    let rb = routes(&b, tok_b.as_ref().unwrap_or(&w.tok), &label_b)?;
    let formats = (format_of(&a)?, format_of(&b)?);
    let report = build_report(&ra, &rb, text, formats, matches!(with, CompareWith::Format(_)));
    emit(EngineEvent::Compare(Box::new(report)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(ids: &[u32], spans: &[(usize, usize)], k: usize, experts: &[u32]) -> ModelRoutes {
        ModelRoutes {
            num_layers: 1,
            layers: vec![0],
            n_experts: vec![4],
            k: vec![k],
            ids: ids.to_vec(),
            spans: spans.to_vec(),
            source: vec![0; ids.len()],
            experts: vec![experts.to_vec()],
            entropy: vec![vec![0.0; ids.len()]],
            ..Default::default()
        }
    }

    #[test]
    fn flips_and_jaccard_count_the_aligned_pairs() {
        let sp = [(0, 1), (1, 2), (2, 3), (3, 4)];
        let a = routes(&[1, 2, 3, 4], &sp, 1, &[0, 1, 2, 3]);
        let b = routes(&[1, 2, 3, 4], &sp, 1, &[0, 2, 2, 1]);
        let r = build_report(&a, &b, "abcd", ("f32".into(), "int8".into()), true);
        assert!(r.same_tokens);
        assert_eq!((r.layers[0].flips, r.layers[0].pairs), (2, 4));
        assert_eq!(r.layers[0].jaccard, None);
        assert_eq!(r.a.pieces, vec!["a", "b", "c", "d"]);
        // loads 1,1,1,1 against 1,1,2,0: CV 0 and √0.5
        assert!(r.a.cv[0].abs() < 1e-12 && (r.b.cv[0] - 0.5f64.sqrt()).abs() < 1e-12);
        // top-2 on one side, other spans: [ab][cd] against [a][b][c][d]
        let c = routes(&[7, 8], &[(0, 2), (2, 4)], 2, &[0, 1, 3, 2]);
        let r = build_report(&a, &c, "abcd", ("f32".into(), "bf16".into()), false);
        assert!(!r.same_tokens);
        assert_eq!(r.pairs, vec![(0, 0), (1, 0), (2, 1), (3, 1)]);
        assert_eq!(r.partner(2), Some(1));
        // first experts: a 0,1,2,3 vs c 0,0,3,3 -> 2 flips; sets {0}/{0,1}: ½, {1}/{0,1}: ½, {2}/{3,2}: ½, {3}/{3,2}: ½
        assert_eq!(r.layers[0].flips, 2);
        assert!((r.layers[0].jaccard.unwrap_or(0.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn layers_match_by_relative_depth() {
        assert_eq!((0..3).map(|i| matching_slot(i, 3, 3)).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!((0..4).map(|i| matching_slot(i, 4, 2)).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
        assert_eq!(matching_slot(1, 2, 16), 15);
        assert_eq!(matching_slot(3, 4, 1), 0);
        assert_eq!(base_label("embedded [int8]"), "embedded");
        assert_eq!(base_label("embedded"), "embedded");
    }
}
