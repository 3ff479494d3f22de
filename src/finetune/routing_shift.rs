//! What a fine-tune run did to the routing: per MoE layer, the share of tokens each expert takes
//! on a held-out slice of the data, under the base model and under the tuned one (both routing
//! greedily, as served). Written beside the checkpoint as `routing_shift.json` at the end of a
//! run, with a one-paragraph summary for the terminal.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::finetune::data::{Batch, Example};
use crate::finetune::loss::inference_view;
use crate::model::probe::Probe;
use crate::model::{Logits, Model};

/// The file in the run's output folder.
pub const ROUTING_FILE: &str = "routing_shift.json";

/// Expert shares of one MoE layer before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerShift {
    /// Half-block index of the layer.
    pub layer: usize,
    /// Share of the tokens routed to each expert by the base model (sums to 1).
    pub before: Vec<f64>,
    /// The same under the tuned model.
    pub after: Vec<f64>,
    /// Total variation distance between the two: half the summed absolute change, in [0, 1].
    pub moved: f64,
    /// Share of tokens whose expert changed.
    pub tokens_rerouted: f64,
}

/// The routing comparison of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingShift {
    /// Where the tokens came from (held-out examples, or the first training examples).
    pub slice: String,
    /// Tokens compared.
    pub tokens: usize,
    pub layers: Vec<LayerShift>,
}

/// The greedy expert of every (non-padding) token of `examples`, per MoE layer: (half-block
/// index, n experts, experts).
pub type Routes = Vec<(usize, usize, Vec<u32>)>;

/// Routes `examples` through `model` as served, `batch` at a time.
pub fn routes(model: &Model, examples: &[Example], batch: usize) -> Result<Routes> {
    let m = inference_view(model)?;
    let mut out: Routes = Vec::new();
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = Batch::new(&refs, &m.device)?;
        let (bsz, len) = b.ids.dims2()?;
        let mut probe = Probe {
            moe_only: true,
            ..Probe::default()
        };
        let mut state = m.new_state(bsz)?;
        m.forward(&b.ids, &mut state, Logits::Last, Some(&mut probe))?;
        if out.is_empty() {
            out = probe.moe.iter().map(|r| (r.layer, r.n_experts, Vec::new())).collect();
        }
        for (acc, rec) in out.iter_mut().zip(&probe.moe) {
            for (row, ex) in chunk.iter().enumerate() {
                let n = ex.ids.len().saturating_sub(1);
                acc.2.extend_from_slice(&rec.experts[row * len..row * len + n]);
            }
        }
    }
    Ok(out)
}

fn shares(experts: &[u32], n: usize) -> Vec<f64> {
    let mut c = vec![0f64; n];
    for &e in experts {
        if let Some(x) = c.get_mut(e as usize) {
            *x += 1.0;
        }
    }
    let total = experts.len().max(1) as f64;
    c.iter().map(|x| x / total).collect()
}

impl RoutingShift {
    /// Compares the routes of the same tokens before and after.
    pub fn compare(slice: &str, before: &Routes, after: &Routes) -> Self {
        let layers: Vec<LayerShift> = before
            .iter()
            .zip(after)
            .map(|((layer, n, b), (_, _, a))| {
                let (sb, sa) = (shares(b, *n), shares(a, *n));
                let moved = sb.iter().zip(&sa).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0;
                let changed = b.iter().zip(a).filter(|(x, y)| x != y).count();
                LayerShift {
                    layer: *layer,
                    before: sb,
                    after: sa,
                    moved,
                    tokens_rerouted: changed as f64 / b.len().max(1) as f64,
                }
            })
            .collect();
        Self {
            slice: slice.to_string(),
            tokens: before.first().map_or(0, |l| l.2.len()),
            layers,
        }
    }

    /// Writes `DIR/routing_shift.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(format!("routing comparison: {e}")))?;
        crate::model::weights::write_atomic(&dir.join(ROUTING_FILE), text.as_bytes())
    }

    /// One paragraph: how far each layer's expert shares moved, the layer that moved most and its
    /// expert that gained and lost most.
    pub fn summary(&self) -> String {
        if self.layers.is_empty() {
            return "routing: the model has no MoE layer".into();
        }
        let per: Vec<String> = self.layers.iter().map(|l| format!("{} {:.1}%", l.layer, 100.0 * l.moved)).collect();
        let mut s = format!(
            "routing before vs after on {} tokens of {}: expert shares moved (total variation) per MoE layer: {}",
            self.tokens,
            self.slice,
            per.join(", ")
        );
        let top = self.layers.iter().max_by(|a, b| a.moved.total_cmp(&b.moved));
        if let Some(l) = top {
            let delta: Vec<f64> = l.after.iter().zip(&l.before).map(|(a, b)| a - b).collect();
            let argmax = |f: &dyn Fn(f64) -> f64| (0..delta.len()).max_by(|&i, &j| f(delta[i]).total_cmp(&f(delta[j])));
            if let (Some(up), Some(down)) = (argmax(&|d| d), argmax(&|d| -d)) {
                s.push_str(&format!(
                    "; most in layer {} ({:.1}% of its tokens changed expert; expert {up} {:+.1} points, expert {down} {:+.1})",
                    l.layer,
                    100.0 * l.tokens_rerouted,
                    100.0 * delta[up],
                    100.0 * delta[down]
                ));
            }
        }
        s.push_str(&format!(". Saved as {ROUTING_FILE}."));
        s
    }
}
