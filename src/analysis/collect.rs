//! What `analyze` keeps while the input streams through the model: the routes (one byte per token
//! and MoE layer), Sinkhorn runs on windows of router logits, and running means of the Mamba
//! state telemetry. Logits are dropped as soon as their window is done, so memory grows by
//! 4 + (MoE layers) bytes per token.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::probe::Probe;
use crate::sinkhorn::{greedy, sinkhorn, SinkhornIter, SinkhornOpts, Variant};

use super::input::Chunk;
use super::metrics;

/// The routes of every MoE layer over a token sequence: plain data, also what the TUI's routing
/// grid exports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Half-block index of each MoE layer.
    pub layers: Vec<usize>,
    /// Experts of each MoE layer.
    pub n_experts: Vec<usize>,
    /// (T) token ids
    pub ids: Vec<u32>,
    /// (n_moe, T) chosen expert
    pub routes: Vec<Vec<u8>>,
    /// (n_moe, E) Σ over tokens routed to each expert of its sigmoid gate
    pub gate_sums: Vec<Vec<f64>>,
}

impl RouteTable {
    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Appends a chunk's routes.
    pub fn push(&mut self, ids: &[u32], probe: &Probe) -> Result<()> {
        if self.layers.is_empty() {
            self.layers = probe.moe.iter().map(|m| m.layer).collect();
            self.n_experts = probe.moe.iter().map(|m| m.n_experts).collect();
            self.routes = vec![Vec::new(); probe.moe.len()];
            self.gate_sums = self.n_experts.iter().map(|&e| vec![0.0; e]).collect();
        }
        if probe.moe.len() != self.layers.len() {
            return Err(Error::Invalid("probe layout changed between chunks".into()));
        }
        for (m, rec) in probe.moe.iter().enumerate() {
            if rec.experts.len() != ids.len() {
                return Err(Error::Invalid(format!(
                    "probe of layer {} has {} routes for {} tokens",
                    rec.layer,
                    rec.experts.len(),
                    ids.len()
                )));
            }
            for (t, &e) in rec.experts.iter().enumerate() {
                self.routes[m].push(u8::try_from(e).unwrap_or(u8::MAX));
                if let Some(g) = self.gate_sums[m].get_mut(e as usize) {
                    *g += f64::from(rec.gate(t));
                }
            }
        }
        self.ids.extend_from_slice(ids);
        Ok(())
    }

    /// Checks that another table routes the same tokens through the same MoE layout.
    pub fn check_comparable(&self, other: &RouteTable) -> Result<()> {
        if self.layers != other.layers || self.n_experts != other.n_experts {
            return Err(Error::Invalid(format!(
                "--compare: the models differ in their MoE layers ({:?} with {:?} experts vs {:?} with {:?}); drift needs the same layout",
                self.layers, self.n_experts, other.layers, other.n_experts
            )));
        }
        if self.ids != other.ids {
            return Err(Error::Invalid("--compare: the two runs saw different token ids".into()));
        }
        Ok(())
    }
}

/// Sinkhorn statistics of one MoE layer over all windows, for one variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkhornLayer {
    pub layer: usize,
    pub windows: u64,
    pub tokens: u64,
    /// Tokens whose Sinkhorn expert differs from the greedy (argmax) one.
    pub disagreements: u64,
    pub iters_sum: u64,
    pub iters_max: u64,
    pub converged: u64,
    /// Σ over windows of the CV of the greedy loads / of the Sinkhorn loads within the window.
    pub cv_greedy_sum: f64,
    pub cv_sinkhorn_sum: f64,
    /// The convergence trace of the first window.
    pub first_trace: Vec<SinkhornIter>,
    pub first_window_tokens: u64,
}

/// Sinkhorn run on consecutive windows of each MoE layer's router logits.
#[derive(Debug, Clone)]
pub struct SinkhornWindows {
    pub window: usize,
    pub opts: Vec<SinkhornOpts>,
    /// (variant, MoE layer)
    pub layers: Vec<Vec<SinkhornLayer>>,
    /// (MoE layer) logits of the open window, (t, E) row-major
    buf: Vec<Vec<f32>>,
    n_experts: Vec<usize>,
}

impl SinkhornWindows {
    /// Both variants with the reference tolerance and a cap of `max_iters`.
    pub fn new(window: usize, max_iters: usize) -> Self {
        let opts = [Variant::Zyphra, Variant::Standard]
            .into_iter()
            .map(|variant| SinkhornOpts {
                variant,
                max_iters,
                ..SinkhornOpts::default()
            })
            .collect();
        Self {
            window: window.max(2),
            opts,
            layers: Vec::new(),
            buf: Vec::new(),
            n_experts: Vec::new(),
        }
    }

    pub fn push(&mut self, probe: &Probe) {
        if self.buf.is_empty() {
            self.buf = vec![Vec::new(); probe.moe.len()];
            self.n_experts = probe.moe.iter().map(|m| m.n_experts).collect();
            self.layers = (0..self.opts.len())
                .map(|_| {
                    probe
                        .moe
                        .iter()
                        .map(|m| SinkhornLayer {
                            layer: m.layer,
                            ..Default::default()
                        })
                        .collect()
                })
                .collect();
        }
        for (m, rec) in probe.moe.iter().enumerate() {
            let e = rec.n_experts;
            let mut rest = rec.logits.as_slice();
            while !rest.is_empty() {
                let need = self.window * e - self.buf[m].len();
                let take = need.min(rest.len());
                self.buf[m].extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.buf[m].len() == self.window * e {
                    self.run(m);
                }
            }
        }
    }

    /// Runs the last, partial windows (2 tokens or more).
    pub fn finish(&mut self) {
        for m in 0..self.buf.len() {
            if self.buf[m].len() >= 2 * self.n_experts[m] {
                self.run(m);
            }
        }
    }

    fn run(&mut self, m: usize) {
        let cost = std::mem::take(&mut self.buf[m]);
        let e = self.n_experts[m];
        let t = cost.len() / e;
        let g = greedy(&cost, t, e);
        let g8: Vec<u8> = g.iter().map(|&x| x as u8).collect();
        let cv_g = metrics::cv(&metrics::loads(&g8, e));
        for (v, opts) in self.opts.iter().enumerate() {
            let r = sinkhorn(&cost, t, e, opts);
            let s8: Vec<u8> = r.assignment.iter().map(|&x| x as u8).collect();
            let l = &mut self.layers[v][m];
            if l.windows == 0 {
                l.first_trace = r.trace.clone();
                l.first_window_tokens = t as u64;
            }
            l.windows += 1;
            l.tokens += t as u64;
            l.disagreements += metrics::changed(&g8, &s8);
            l.iters_sum += r.iters() as u64;
            l.iters_max = l.iters_max.max(r.iters() as u64);
            l.converged += u64::from(r.converged);
            l.cv_greedy_sum += cv_g;
            l.cv_sinkhorn_sum += metrics::cv(&metrics::loads(&s8, e));
        }
        self.buf[m] = cost;
        self.buf[m].clear();
    }
}

/// Running means of one Mamba layer's state telemetry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MambaStats {
    pub layer: usize,
    pub tokens: u64,
    pub ssm_norm_sum: f64,
    pub ssm_norm_max: f64,
    pub conv_norm_sum: f64,
    pub delta_sum: f64,
}

/// Everything `analyze` gathers from one model.
#[derive(Debug, Clone)]
pub struct Collected {
    pub routes: RouteTable,
    pub sinkhorn: SinkhornWindows,
    pub mamba: Vec<MambaStats>,
}

impl Collected {
    pub fn new(window: usize, max_iters: usize) -> Self {
        Self {
            routes: RouteTable::default(),
            sinkhorn: SinkhornWindows::new(window, max_iters),
            mamba: Vec::new(),
        }
    }

    /// Takes one chunk.
    pub fn push(&mut self, c: &Chunk<'_>) -> Result<()> {
        self.routes.push(c.ids, c.probe)?;
        self.sinkhorn.push(c.probe);
        if self.mamba.is_empty() {
            self.mamba = c
                .probe
                .mamba
                .iter()
                .map(|r| MambaStats {
                    layer: r.layer,
                    ..Default::default()
                })
                .collect();
        }
        for (s, r) in self.mamba.iter_mut().zip(&c.probe.mamba) {
            s.tokens += r.ssm_norm.len() as u64;
            for &x in &r.ssm_norm {
                s.ssm_norm_sum += f64::from(x);
                s.ssm_norm_max = s.ssm_norm_max.max(f64::from(x));
            }
            s.conv_norm_sum += r.conv_norm.iter().map(|&x| f64::from(x)).sum::<f64>();
            s.delta_sum += r.mean_delta.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        Ok(())
    }

    /// Closes the open Sinkhorn windows.
    pub fn finish(&mut self) {
        self.sinkhorn.finish();
    }
}
