//! The MoE mixer (SwitchMLP, SPEC §3; Fedus et al., "Switch Transformers"; Zyphra `switch_mlp.py`)
//! and its expert, which is also the dense MLP of a `"1"` layer.
//!
//! Router with bias → sigmoid → top-1; the chosen expert computes fc2(act(fc1_gate x) ⊙ fc1_up x)
//! and its output is scaled by the sigmoid probability (not renormalised). Tokens are grouped per
//! expert, so each expert runs only on its own tokens. While fine-tuning, Sinkhorn over the batch
//! picks the experts (under no-grad) and the router learns only through the gate value.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::config::{Activation, Config};
use crate::model::linear::Linear;
use crate::model::mamba::take;
use crate::model::permute::RowPermutation;
use crate::model::probe::MoeRecord;
use crate::ops::prof::{self, lap};
use crate::sinkhorn::{greedy, sinkhorn, SinkhornOpts, SinkhornResult};

/// How tokens pick their expert.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Routing {
    /// argmax of the router logits (inference, as the released code).
    #[default]
    Greedy,
    /// Sinkhorn-balanced over the tokens of the call (training, SPEC §3).
    Sinkhorn(SinkhornOpts),
}

/// One expert / dense MLP: `fc2(act(fc1[:f] x) ⊙ fc1[f:] x)`, or `fc2(act(fc1 x))` without gating.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub gated: bool,
    pub act: Activation,
}

impl Mlp {
    /// Takes `{p}.linear_fc1.*` and `{p}.linear_fc2.*` out of `w`.
    pub fn new(cfg: &Config, p: &str, w: &mut HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(
                take(w, &format!("{p}.linear_fc1.weight"))?,
                w.remove(&format!("{p}.linear_fc1.bias")),
            ),
            fc2: Linear::new(
                take(w, &format!("{p}.linear_fc2.weight"))?,
                w.remove(&format!("{p}.linear_fc2.bias")),
            ),
            gated: cfg.swiglu,
            act: cfg.expert_activation,
        })
    }

    /// Visits `{prefix}linear_fc1.*` and `{prefix}linear_fc2.*` (prefix ends in a dot or is empty).
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.fc1.visit_mut(&format!("{prefix}linear_fc1"), f)?;
        self.fc2.visit_mut(&format!("{prefix}linear_fc2"), f)
    }

    /// x (n, d) -> (n, d), in the weight dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, false)
    }

    /// As [`Mlp::forward`]; with `fused_act` on a CUDA tensor, the gated activation runs as one
    /// autograd op (`crate::ops::gated_act`, fine-tuning) instead of its tensor-op twin.
    pub fn forward_fused(&self, x: &Tensor, fused_act: bool) -> Result<Tensor> {
        let mut laps = prof::start(x.device())?; // `bench --finetune --profile`; None otherwise
        let a = self.fc1.forward(x)?; // (n, fc1_rows)
        lap(&mut laps, "mlp fc1")?;
        #[cfg(feature = "cuda")]
        if fused_act && self.gated && a.device().is_cuda() {
            let mut dims = a.dims().to_vec(); // (.., 2f)
            let last = dims.len() - 1;
            let h = crate::ops::gated_act::gated_act(&a.reshape(((), dims[last]))?, self.act)?; // (n, f)
            lap(&mut laps, "mlp gated act (fused)")?;
            dims[last] /= 2;
            let y = self.fc2.forward(&h.reshape(dims)?)?; // (.., d)
            lap(&mut laps, "mlp fc2")?;
            return Ok(y);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = fused_act;
        let h = if self.gated {
            let f = a.dim(D::Minus1)? / 2;
            let gate = a.narrow(D::Minus1, 0, f)?; // (n, f)
            let up = a.narrow(D::Minus1, f, f)?; // (n, f)
            (self.activate(&gate)? * up)?
        } else {
            self.activate(&a)?
        };
        lap(&mut laps, "mlp act (tensor ops)")?;
        let y = self.fc2.forward(&h)?; // (n, d)
        lap(&mut laps, "mlp fc2")?;
        Ok(y)
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        self.act.apply(x)
    }
}

/// The SwitchMLP mixer: router + experts.
#[derive(Debug, Clone)]
pub struct SwitchMlp {
    /// (E, d) weight and (E) bias, f32
    pub router: Linear,
    pub experts: Vec<Mlp>,
}

impl SwitchMlp {
    pub fn new(cfg: &Config, p: &str, n_experts: usize, w: &mut HashMap<String, Tensor>) -> Result<Self> {
        let router = Linear::new(
            take(w, &format!("{p}.router.weight"))?.to_dtype(DType::F32)?,
            Some(take(w, &format!("{p}.router.bias"))?.to_dtype(DType::F32)?),
        );
        let experts = (0..n_experts)
            .map(|e| Mlp::new(cfg, &format!("{p}.local_experts.{e}"), w))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { router, experts })
    }

    /// Visits `router.*` and `local_experts.{e}.*`.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.router.visit_mut("router", f)?;
        for (e, x) in self.experts.iter_mut().enumerate() {
            x.visit_mut(&format!("local_experts.{e}."), f)?;
        }
        Ok(())
    }

    /// x (.., d) -> (.., d). Tokens route independently (greedy) or jointly (Sinkhorn).
    pub fn forward(&self, x: &Tensor, routing: Routing, probe: Option<&mut MoeRecord>) -> Result<Tensor> {
        self.forward_cached(x, routing, probe, None, false)
    }

    /// As [`SwitchMlp::forward`], with a routing cache: an empty `cache` slot receives this call's
    /// [`Route`], a filled one is taken as is (the experts it names, not the router's choice now;
    /// the gate values still come from the router, which is how it gets its gradient). Fine-tuning
    /// decides in pass 1 and reuses the route in the recomputed pass (`finetune::recompute`).
    /// `fused_act` as in [`Mlp::forward_fused`]; it also lets Sinkhorn run on the device.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        routing: Routing,
        probe: Option<&mut MoeRecord>,
        cache: Option<&mut Option<Route>>,
        fused_act: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let xs = x.reshape(((), d))?; // (T, d)
        let n_tok = xs.dim(0)?;
        let n_exp = self.experts.len();
        let dev = x.device();
        let mut laps = prof::start(dev)?; // `bench --finetune --profile`; None otherwise
        let logits = self.router.forward(&xs.to_dtype(DType::F32)?)?; // (T, E) f32
        lap(&mut laps, "moe router logits")?;
        let mut fresh = None;
        let route = match cache {
            Some(Some(r)) if r.experts.len() == n_tok => {
                if let Some(p) = probe {
                    let host: Vec<f32> = logits.detach().flatten_all()?.to_vec1()?;
                    r.record(p, &host, n_exp, None);
                    lap(&mut laps, "moe route: logits to host (probe)")?;
                }
                &*r
            }
            Some(Some(r)) => {
                return Err(Error::Invalid(format!(
                    "MoE routing cache holds {} tokens, the call has {n_tok}",
                    r.experts.len()
                )))
            }
            Some(slot) => &*slot.insert(Route::decide(&logits, n_tok, n_exp, routing, probe, fused_act)?),
            None => &*fresh.insert(Route::decide(&logits, n_tok, n_exp, routing, probe, fused_act)?),
        };
        laps = prof::start(dev)?; // the decision timed its own parts
        let probs = candle_nn::ops::sigmoid(&logits)?; // (T, E)
        let gate = probs.gather(&route.idx, 1)?; // (T, 1): σ(r)[e*], the router's only gradient path
        let wdt = self.experts[0].fc1.weight.dtype();
        let xs = xs.to_dtype(wdt)?;
        lap(&mut laps, "moe gate")?;
        let y = match &route.group {
            None => self.experts[route.experts[0] as usize].forward_fused(&xs, fused_act)?,
            Some((group, counts)) => {
                let sorted = group.apply(&xs)?; // (T, d) grouped by expert
                lap(&mut laps, "moe group tokens by expert")?;
                let mut outs = Vec::with_capacity(n_exp);
                let mut off = 0;
                for (e, &n) in counts.iter().enumerate() {
                    if n > 0 {
                        outs.push(self.experts[e].forward_fused(&sorted.narrow(0, off, n)?, fused_act)?); // (n, d)
                        off += n;
                    }
                }
                laps = prof::start(dev)?; // the experts timed their own parts
                let ys = Tensor::cat(&outs, 0)?; // (T, d) grouped
                let y = group.inverse().apply(&ys)?; // (T, d) token order
                lap(&mut laps, "moe cat+ungroup")?;
                y
            }
        };
        laps = prof::start(dev)?;
        let y = y.to_dtype(DType::F32)?.broadcast_mul(&gate)?; // scale by the gate, f32
        lap(&mut laps, "moe scale by gate")?;
        Ok(y.reshape(dims)?)
    }
}

/// One MoE call's routing decision: each token's expert, and the grouping derived from it (on the
/// device). Deciding costs a copy of the logits to the host and, for Sinkhorn, its iterations.
#[derive(Debug, Clone)]
pub struct Route {
    /// (T) the expert of each token
    experts: Vec<u32>,
    /// (T, 1) u32, the same on the device
    idx: Tensor,
    /// tokens sorted by expert and the per-expert counts; None for a single token
    group: Option<(RowPermutation, Vec<usize>)>,
}

/// Sinkhorn over a call's router logits: on the device where they are on a CUDA device and
/// `device` allows it (the model's kernels on: `ops::sinkhorn`, the same passes and assignment
/// as the host's, to the order of its f64 sums; `tests/gpu_parity.rs`), else on the host copy.
fn sinkhorn_on(logits: &Tensor, host: &[f32], n_tok: usize, n_exp: usize, opts: &SinkhornOpts, device: bool) -> Result<SinkhornResult> {
    #[cfg(feature = "cuda")]
    if device && logits.device().is_cuda() && n_exp <= 32 {
        return crate::ops::sinkhorn::sinkhorn(logits, opts);
    }
    let _ = (logits, device);
    Ok(sinkhorn(host, n_tok, n_exp, opts))
}

impl Route {
    /// Decides from the router logits (T, E) f32, recording into `probe`: greedy on the host copy,
    /// Sinkhorn on the device where it can ([`sinkhorn_on`]); the grouping on the host.
    pub(crate) fn decide(
        logits: &Tensor,
        n_tok: usize,
        n_exp: usize,
        routing: Routing,
        probe: Option<&mut MoeRecord>,
        device: bool,
    ) -> Result<Self> {
        let dev = logits.device();
        let mut laps = prof::start(dev)?; // `bench --finetune --profile`; None otherwise
        let host: Vec<f32> = logits.detach().flatten_all()?.to_vec1()?; // routing is decided on the host
        lap(&mut laps, "moe route: logits to host")?;
        let (experts, trace) = match routing {
            Routing::Greedy => (greedy(&host, n_tok, n_exp), None),
            Routing::Sinkhorn(opts) => {
                let r = sinkhorn_on(logits, &host, n_tok, n_exp, &opts, device)?;
                (r.assignment.clone(), Some(r))
            }
        };
        lap(&mut laps, "moe route: sinkhorn / argmax (host)")?;
        let idx = Tensor::from_slice(&experts, (n_tok, 1), dev)?;
        let group = if n_tok == 1 {
            None
        } else {
            // group tokens by expert (a stable counting sort: token order within an expert): one
            // gather in, one gather back
            let counts = crate::sinkhorn::loads(&experts, n_exp);
            let mut next: Vec<usize> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
            let mut order = vec![0u32; n_tok];
            for (t, &e) in experts.iter().enumerate() {
                let slot = next
                    .get_mut(e as usize)
                    .ok_or_else(|| Error::Invalid(format!("routing chose expert {e} of {n_exp}")))?;
                order[*slot] = t as u32;
                *slot += 1;
            }
            Some((RowPermutation::new(&order, dev)?, counts))
        };
        let route = Self { experts, idx, group };
        if let Some(p) = probe {
            route.record(p, &host, n_exp, trace);
        }
        lap(&mut laps, "moe route: permutation to device")?;
        Ok(route)
    }

    /// (T, 1) u32 on the device: the expert of each token.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn idx(&self) -> &Tensor {
        &self.idx
    }

    /// The tokens grouped by expert (the permutation to the grouped order) and the tokens per
    /// expert; None for a single token.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn grouping(&self) -> Option<(&RowPermutation, &[usize])> {
        self.group.as_ref().map(|(p, c)| (p, c.as_slice()))
    }

    /// The expert of each token (T).
    pub fn experts(&self) -> &[u32] {
        &self.experts
    }

    fn record(&self, p: &mut MoeRecord, host_logits: &[f32], n_exp: usize, trace: Option<SinkhornResult>) {
        p.n_experts = n_exp;
        p.logits.extend_from_slice(host_logits);
        p.experts.extend_from_slice(&self.experts);
        if let Some(t) = trace {
            p.sinkhorn = Some(t);
        }
    }
}
