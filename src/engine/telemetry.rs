//! Probe records → plain per-token telemetry for the UI, and the router-logit history that the
//! Sinkhorn view runs over.

use tokenizers::Tokenizer;

use crate::engine::protocol::{Route, TokenRec};
use crate::lm::probe::SharedProbe;
use crate::model::probe::Probe;
use crate::tokenizer::{decode, EOS_ID};

/// The text of one token for axis labels: `<eos>` for end-of-text, else its decoded text.
pub fn piece(tok: &Tokenizer, id: u32) -> String {
    if id == EOS_ID {
        return "<eos>".into();
    }
    decode(tok, &[id]).unwrap_or_else(|_| format!("#{id}"))
}

/// One record per token of `ids` (fed at positions `pos0..`), with the probe's telemetry when the
/// probe covers exactly these tokens.
pub fn records(tok: &Tokenizer, ids: &[u32], pos0: usize, generated: bool, probe: Option<&Probe>) -> Vec<TokenRec> {
    let probe = probe.filter(|p| p.n_tokens == ids.len());
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            let mut rec = TokenRec {
                pos: pos0 + t,
                id,
                piece: piece(tok, id),
                generated,
                ..Default::default()
            };
            if let Some(p) = probe {
                rec.routes = p
                    .moe
                    .iter()
                    .map(|m| match m.experts.get(t) {
                        Some(&e) if (e as usize) < m.n_experts && m.logits.len() >= (t + 1) * m.n_experts => Route {
                            expert: e as u16,
                            prob: m.prob(t, e as usize),
                        },
                        _ => Route { expert: 0, prob: f32::NAN },
                    })
                    .collect();
                let at = |v: &Vec<f32>| v.get(t).copied().unwrap_or(f32::NAN);
                rec.ssm_norm = p.mamba.iter().map(|m| at(&m.ssm_norm)).collect();
                rec.conv_norm = p.mamba.iter().map(|m| at(&m.conv_norm)).collect();
                rec.mean_delta = p.mamba.iter().map(|m| at(&m.mean_delta)).collect();
            }
            rec
        })
        .collect()
}

/// [`records`] from the probe both families share: the first expert and its router probability
/// in `routes`, the other k − 1 in `more` (a top-k transformer), no state norms.
pub fn records_shared(tok: &Tokenizer, ids: &[u32], pos0: usize, generated: bool, probe: Option<&SharedProbe>) -> Vec<TokenRec> {
    let probe = probe.filter(|p| p.tokens == ids.len());
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            let mut rec = TokenRec {
                pos: pos0 + t,
                id,
                piece: piece(tok, id),
                generated,
                ..Default::default()
            };
            for m in probe.map_or(&[][..], |p| p.moe.as_slice()) {
                let (experts, probs) = (m.experts_of(t), m.probs_of(t));
                let chosen: Vec<(u16, f32)> = experts
                    .iter()
                    .zip(probs)
                    .map(|(&e, &p)| (u16::try_from(e).unwrap_or(u16::MAX), p))
                    .collect();
                let first = chosen.first().copied().unwrap_or((0, f32::NAN));
                rec.routes.push(Route {
                    expert: first.0,
                    prob: first.1,
                });
                rec.more.push(chosen.get(1..).unwrap_or(&[]).to_vec());
            }
            rec
        })
        .collect()
}

/// Router logits of every token fed so far, per MoE layer, for Sinkhorn over a window.
#[derive(Debug, Clone, Default)]
pub struct RouterHistory {
    /// Experts per MoE layer.
    pub n_experts: Vec<usize>,
    /// Half-block index per MoE layer.
    pub layers: Vec<usize>,
    /// Position of each row.
    pub pos: Vec<usize>,
    /// Per MoE layer: (rows, E) logits, row-major.
    pub logits: Vec<Vec<f32>>,
}

impl RouterHistory {
    pub fn new(moe_layers: &[(usize, usize)]) -> Self {
        Self {
            n_experts: moe_layers.iter().map(|&(_, e)| e).collect(),
            layers: moe_layers.iter().map(|&(l, _)| l).collect(),
            pos: Vec::new(),
            logits: vec![Vec::new(); moe_layers.len()],
        }
    }

    /// Appends the rows of a probe covering tokens at `pos0..`.
    pub fn push(&mut self, probe: &Probe, pos0: usize) {
        let rows: Vec<&[f32]> = probe.moe.iter().map(|m| m.logits.as_slice()).collect();
        self.push_rows(&rows, probe.n_tokens, pos0);
    }

    /// Appends the router scores of a shared probe (either family) covering tokens at `pos0..`.
    pub fn push_shared(&mut self, probe: &SharedProbe, pos0: usize) {
        let rows: Vec<&[f32]> = probe.moe.iter().map(|m| m.scores.as_slice()).collect();
        self.push_rows(&rows, probe.tokens, pos0);
    }

    /// Appends one (n × experts) block of router scores per MoE layer; a probe of another shape
    /// (layers or experts) is ignored.
    fn push_rows(&mut self, rows: &[&[f32]], n: usize, pos0: usize) {
        if rows.len() != self.logits.len() || rows.iter().zip(&self.n_experts).any(|(r, &e)| r.len() != n * e) {
            return;
        }
        for (dst, r) in self.logits.iter_mut().zip(rows) {
            dst.extend_from_slice(r);
        }
        self.pos.extend(pos0..pos0 + n);
    }

    /// Drops every row at position `pos` or later.
    pub fn truncate(&mut self, pos: usize) {
        let keep = self.pos.iter().take_while(|&&p| p < pos).count();
        self.pos.truncate(keep);
        for (l, &e) in self.logits.iter_mut().zip(&self.n_experts) {
            l.truncate(keep * e);
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// The last `n` rows of MoE layer `slot`: (rows, E).
    pub fn window(&self, slot: usize, n: usize) -> (&[f32], usize) {
        let e = self.n_experts.get(slot).copied().unwrap_or(0);
        let rows = n.min(self.len());
        match self.logits.get(slot) {
            Some(l) if e > 0 => (&l[l.len() - rows * e..], rows),
            _ => (&[], 0),
        }
    }
}
