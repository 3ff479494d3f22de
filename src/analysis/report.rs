//! The routing report: one data structure, written as `report.json` (serde) and `report.md`
//! (rendered from the same value by `analysis::markdown`, which also writes both files), so the two always agree.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::sinkhorn::SinkhornIter;

use super::collect::{Collected, RouteTable};
use super::metrics::{self, Balance, Determinism, TokenCount};

/// Settings of the report's computations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportOpts {
    /// Tokens listed per expert.
    pub top: usize,
    /// Least c(token, expert) for a token to be ranked by PMI.
    pub min_count: u64,
    /// Seed of the shuffle behind the chance levels.
    pub seed: u64,
}

impl Default for ReportOpts {
    fn default() -> Self {
        Self {
            top: 8,
            min_count: 5,
            seed: 0,
        }
    }
}

/// What was analysed and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub model: String,
    /// The model has untrained random weights.
    pub untrained: bool,
    pub input: String,
    pub tokens: u64,
    pub distinct_ids: u64,
    pub num_layers: usize,
    /// Half-block index of each MoE layer.
    pub moe_layers: Vec<usize>,
    pub chunk: usize,
    /// Fresh state every this many tokens (0 = one sequence).
    pub reset_every: usize,
    pub opts: ReportOpts,
    /// File names of the figures written beside the report.
    pub plots: Vec<String>,
    pub version: String,
}

/// Balance, stickiness and determinism of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub balance: Balance,
    /// (E) mean sigmoid gate of the tokens each expert took (0 for an idle expert)
    pub mean_gate: Vec<f64>,
    pub stickiness: Option<f64>,
    /// Σ p² of the loads: the stickiness of independent routing.
    pub chance_stickiness: f64,
    pub determinism: Determinism,
    /// The determinism after shuffling the routes over positions.
    pub chance_determinism: Option<f64>,
}

/// One expert's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertTokens {
    pub expert: usize,
    pub load: u64,
    pub frequent: Vec<TokenCount>,
    pub overrepresented: Vec<TokenCount>,
}

/// The experts of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerExperts {
    pub layer: usize,
    pub experts: Vec<ExpertTokens>,
}

/// Which experts two successive MoE layers choose together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coactivation {
    pub from_layer: usize,
    pub to_layer: usize,
    /// (E_from, E_to) token counts
    pub counts: Vec<Vec<u64>>,
    /// nats
    pub mutual_info: f64,
    /// MI / √(H_from·H_to)
    pub nmi: f64,
}

/// Sinkhorn on windows for one MoE layer and one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkhornLayerReport {
    pub layer: usize,
    pub windows: u64,
    pub tokens: u64,
    /// Share of tokens whose Sinkhorn expert differs from the greedy one.
    pub disagreement: f64,
    pub mean_iters: f64,
    pub max_iters: u64,
    /// Windows whose run met the tolerance before the cap.
    pub converged: u64,
    /// Mean over windows of the CV of the loads within the window.
    pub cv_greedy: f64,
    pub cv_sinkhorn: f64,
    pub first_trace: Vec<SinkhornIter>,
    pub first_window_tokens: u64,
}

/// One Sinkhorn variant over all layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkhornVariantReport {
    pub variant: String,
    pub tol: f64,
    pub max_iters: usize,
    pub layers: Vec<SinkhornLayerReport>,
}

/// Sinkhorn on windows of the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkhornReport {
    pub window: usize,
    pub variants: Vec<SinkhornVariantReport>,
}

/// Means of the Mamba state telemetry of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MambaLayerReport {
    pub layer: usize,
    pub mean_ssm_norm: f64,
    pub max_ssm_norm: f64,
    pub mean_conv_norm: f64,
    pub mean_delta: f64,
}

/// Routing drift of one MoE layer between two models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDrift {
    pub layer: usize,
    pub changed: u64,
    pub tokens: u64,
    /// changed / tokens
    pub share: f64,
    /// 1 − Σ pₐ·p_b: the drift of two independent routings with these loads.
    pub chance: f64,
    /// The other model's balance.
    pub other_balance: Balance,
}

/// Drift against a second model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub other_model: String,
    pub layers: Vec<LayerDrift>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    pub layers: Vec<LayerReport>,
    pub experts: Vec<LayerExperts>,
    pub coactivation: Vec<Coactivation>,
    pub sinkhorn: SinkhornReport,
    pub mamba: Vec<MambaLayerReport>,
    pub drift: Option<DriftReport>,
}

/// Names the run for [`Meta`].
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub model: String,
    pub untrained: bool,
    pub input: String,
    pub num_layers: usize,
    pub chunk: usize,
    pub reset_every: usize,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Per-layer balance, stickiness and determinism of a route table.
pub fn layer_reports(rt: &RouteTable, seed: u64) -> Vec<LayerReport> {
    rt.layers
        .iter()
        .enumerate()
        .map(|(m, &layer)| {
            let e = rt.n_experts[m];
            let route = &rt.routes[m];
            let loads = metrics::loads(route, e);
            LayerReport {
                layer,
                mean_gate: (0..e)
                    .map(|x| if loads[x] > 0 { rt.gate_sums[m][x] / loads[x] as f64 } else { 0.0 })
                    .collect(),
                stickiness: metrics::stickiness(route),
                chance_stickiness: metrics::chance_stickiness(&loads),
                determinism: metrics::determinism(&rt.ids, route, e),
                chance_determinism: metrics::chance_determinism(&rt.ids, route, e, seed.wrapping_add(layer as u64)),
                balance: metrics::balance(&loads),
            }
        })
        .collect()
}

impl Report {
    /// Builds the report from what was collected (and, for drift, a second model's routes).
    pub fn build(info: &RunInfo, c: &Collected, other: Option<(&str, &RouteTable)>, tok: &Tokenizer, opts: ReportOpts) -> Result<Self> {
        let rt = &c.routes;
        let mut texts: HashMap<u32, String> = HashMap::new();
        let mut text_of = |id: u32| -> Result<String> {
            if let Some(t) = texts.get(&id) {
                return Ok(t.clone());
            }
            let t = crate::tokenizer::decode(tok, &[id])?;
            texts.insert(id, t.clone());
            Ok(t)
        };
        let mut experts = Vec::with_capacity(rt.layers.len());
        for (m, &layer) in rt.layers.iter().enumerate() {
            let e = rt.n_experts[m];
            let loads = metrics::loads(&rt.routes[m], e);
            let mut list = Vec::with_capacity(e);
            for (x, (mut frequent, mut overrepresented)) in metrics::expert_tokens(&rt.ids, &rt.routes[m], e, opts.top, opts.min_count)
                .into_iter()
                .enumerate()
            {
                for t in frequent.iter_mut().chain(overrepresented.iter_mut()) {
                    t.text = text_of(t.id)?;
                }
                list.push(ExpertTokens {
                    expert: x,
                    load: loads[x],
                    frequent,
                    overrepresented,
                });
            }
            experts.push(LayerExperts { layer, experts: list });
        }
        let coactivation = (1..rt.layers.len())
            .map(|m| {
                let counts = metrics::coactivation(&rt.routes[m - 1], rt.n_experts[m - 1], &rt.routes[m], rt.n_experts[m]);
                let (mutual_info, nmi) = metrics::mutual_information(&counts);
                Coactivation {
                    from_layer: rt.layers[m - 1],
                    to_layer: rt.layers[m],
                    counts,
                    mutual_info,
                    nmi,
                }
            })
            .collect();
        let sinkhorn = SinkhornReport {
            window: c.sinkhorn.window,
            variants: c
                .sinkhorn
                .opts
                .iter()
                .zip(&c.sinkhorn.layers)
                .map(|(o, ls)| SinkhornVariantReport {
                    variant: o.variant.name().to_string(),
                    tol: o.tol,
                    max_iters: o.max_iters,
                    layers: ls
                        .iter()
                        .map(|l| SinkhornLayerReport {
                            layer: l.layer,
                            windows: l.windows,
                            tokens: l.tokens,
                            disagreement: ratio(l.disagreements, l.tokens),
                            mean_iters: ratio(l.iters_sum, l.windows),
                            max_iters: l.iters_max,
                            converged: l.converged,
                            cv_greedy: if l.windows > 0 { l.cv_greedy_sum / l.windows as f64 } else { 0.0 },
                            cv_sinkhorn: if l.windows > 0 { l.cv_sinkhorn_sum / l.windows as f64 } else { 0.0 },
                            first_trace: l.first_trace.clone(),
                            first_window_tokens: l.first_window_tokens,
                        })
                        .collect(),
                })
                .collect(),
        };
        let mamba = c
            .mamba
            .iter()
            .map(|s| {
                let n = s.tokens.max(1) as f64;
                MambaLayerReport {
                    layer: s.layer,
                    mean_ssm_norm: s.ssm_norm_sum / n,
                    max_ssm_norm: s.ssm_norm_max,
                    mean_conv_norm: s.conv_norm_sum / n,
                    mean_delta: s.delta_sum / n,
                }
            })
            .collect();
        let drift = match other {
            Some((name, o)) => Some(drift(name, rt, o)?),
            None => None,
        };
        let distinct = rt.ids.iter().collect::<std::collections::HashSet<_>>().len() as u64;
        Ok(Self {
            meta: Meta {
                model: info.model.clone(),
                untrained: info.untrained,
                input: info.input.clone(),
                tokens: rt.n_tokens() as u64,
                distinct_ids: distinct,
                num_layers: info.num_layers,
                moe_layers: rt.layers.clone(),
                chunk: info.chunk,
                reset_every: info.reset_every,
                opts,
                plots: Vec::new(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            layers: layer_reports(rt, opts.seed),
            experts,
            coactivation,
            sinkhorn,
            mamba,
            drift,
        })
    }

    /// Reads a `report.json`.
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not a blackmamba report.json ({e})")))
    }
}

/// Per-layer drift between two route tables of the same tokens.
pub fn drift(other_model: &str, a: &RouteTable, b: &RouteTable) -> Result<DriftReport> {
    a.check_comparable(b)?;
    let layers = a
        .layers
        .iter()
        .enumerate()
        .map(|(m, &layer)| {
            let e = a.n_experts[m];
            let (la, lb) = (metrics::loads(&a.routes[m], e), metrics::loads(&b.routes[m], e));
            let changed = metrics::changed(&a.routes[m], &b.routes[m]);
            let tokens = a.routes[m].len() as u64;
            LayerDrift {
                layer,
                changed,
                tokens,
                share: ratio(changed, tokens),
                chance: metrics::chance_drift(&la, &lb),
                other_balance: metrics::balance(&lb),
            }
        })
        .collect();
    Ok(DriftReport {
        other_model: other_model.to_string(),
        layers,
    })
}
