//! The Mamba mixer of a half-block (SPEC §5; Gu & Dao, "Mamba", arXiv 2312.00752, Alg. 2; the
//! reference is mamba_ssm v1.1 `mamba_simple.py` as vendored by Zyphra's `mamba_layer.py`).
//!
//! Two paths over the same math: [`MambaMixer::forward`] for a whole sequence (depthwise causal
//! conv as K shifted products, chunked parallel scan) and [`MambaMixer::step`] for one token with
//! the recurrent state. Both start from and leave behind the same [`LayerState`], so prefill +
//! steps equals one full-sequence pass.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::linear::{softplus, Linear};
use crate::model::probe::MambaRecord;
use crate::model::state::LayerState;
use crate::ops::prof::{self, lap};
use crate::ops::scan::selective_scan;
use crate::ops::scan_train::FusedScan;

/// Weights of one Mamba mixer; names as under `decoder.layers.{i}.mixer.`.
#[derive(Debug, Clone)]
pub struct MambaMixer {
    pub in_proj: Linear,
    /// (d_inner, 1, K) f32: conv1d.weight as in the checkpoint
    pub conv_w: Tensor,
    /// (d_inner) f32
    pub conv_b: Tensor,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    /// (d_inner) f32: the dt bias, added in f32 before the softplus
    pub dt_bias: Tensor,
    /// (d_inner, N) f32: A_log; A = −exp(A_log)
    pub a_log: Tensor,
    /// (d_inner) f32
    pub d: Tensor,
    pub out_proj: Linear,
    pub d_inner: usize,
    pub dt_rank: usize,
    pub d_state: usize,
    pub d_conv: usize,
}

pub(crate) fn take(w: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    w.remove(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
        expected: vec![],
    })
}

impl MambaMixer {
    /// Takes the mixer's tensors (prefix `p` = `decoder.layers.{i}.mixer`) out of `w`.
    pub fn new(cfg: &Config, p: &str, w: &mut HashMap<String, Tensor>) -> Result<Self> {
        let opt = |w: &mut HashMap<String, Tensor>, n: &str| w.remove(&format!("{p}.{n}"));
        let in_proj = Linear::new(take(w, &format!("{p}.in_proj.weight"))?, opt(w, "in_proj.bias"));
        let conv_w = take(w, &format!("{p}.conv1d.weight"))?.to_dtype(DType::F32)?; // (d_inner, 1, K)
        Ok(Self {
            in_proj,
            conv_w,
            conv_b: take(w, &format!("{p}.conv1d.bias"))?.to_dtype(DType::F32)?,
            x_proj: Linear::new(take(w, &format!("{p}.x_proj.weight"))?, None),
            dt_proj: Linear::new(take(w, &format!("{p}.dt_proj.weight"))?, None),
            dt_bias: take(w, &format!("{p}.dt_proj.bias"))?.to_dtype(DType::F32)?,
            a_log: take(w, &format!("{p}.A_log"))?.to_dtype(DType::F32)?,
            d: take(w, &format!("{p}.D"))?.to_dtype(DType::F32)?,
            out_proj: Linear::new(take(w, &format!("{p}.out_proj.weight"))?, opt(w, "out_proj.bias")),
            d_inner: cfg.d_inner(),
            dt_rank: cfg.dt_rank(),
            d_state: cfg.state_size,
            d_conv: cfg.conv_dimension,
        })
    }

    /// Visits every tensor with its name relative to the mixer (`in_proj.weight`, ...).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.in_proj.visit_mut("in_proj", f)?;
        f("conv1d.weight", &mut self.conv_w)?;
        f("conv1d.bias", &mut self.conv_b)?;
        self.x_proj.visit_mut("x_proj", f)?;
        self.dt_proj.visit_mut("dt_proj", f)?;
        f("dt_proj.bias", &mut self.dt_bias)?;
        f("A_log", &mut self.a_log)?;
        f("D", &mut self.d)?;
        self.out_proj.visit_mut("out_proj", f)
    }

    /// Full sequence: x (B, L, d) -> (B, L, d), from and into `state`. `fused_scan` lets the
    /// model scan with a fused autograd op that keeps only its inputs (fine-tuning; see
    /// `ops::scan_train::training_scan`); without a probe only. (On CUDA, fine-tuning takes the
    /// whole mixer past the projections as fused ops instead: `Model::block` picks
    /// `model::fused::mamba_train`.)
    pub fn forward(&self, x: &Tensor, state: &mut LayerState, probe: Option<&mut MambaRecord>, fused_scan: FusedScan) -> Result<Tensor> {
        let (_b, len, _d) = x.dims3()?;
        let (di, k) = (self.d_inner, self.d_conv);
        let mut laps = prof::start(x.device())?; // `bench --finetune --profile`; None otherwise
        let xz = self.in_proj.forward(x)?; // (B, L, 2·di)  eq. 1: [u; z] = W_in x
        lap(&mut laps, "mamba in_proj")?;
        let u = xz.narrow(D::Minus1, 0, di)?.to_dtype(DType::F32)?; // (B, L, di)
        let z = xz.narrow(D::Minus1, di, di)?.to_dtype(DType::F32)?; // (B, L, di)
                                                                     // eq. 2: causal depthwise conv over [previous K−1 inputs ; u]
        let prev = state.conv.narrow(2, 1, k - 1)?.transpose(1, 2)?; // (B, K−1, di)
        let u_ext = Tensor::cat(&[&prev, &u], 1)?; // (B, L+K−1, di)
        let conv_w = self.conv_w.squeeze(1)?; // (di, K)
        let mut c = self.conv_b.unsqueeze(0)?.unsqueeze(0)?; // (1, 1, di)
        for tap in 0..k {
            let w_tap = conv_w.narrow(1, tap, 1)?.squeeze(1)?; // (di)
            c = u_ext.narrow(1, tap, len)?.broadcast_mul(&w_tap)?.broadcast_add(&c)?;
            // (B, L, di)
        }
        let new_conv = u_ext.narrow(1, len - 1, k)?.transpose(1, 2)?.contiguous()?; // (B, di, K)
        let v = candle_nn::ops::silu(&c)?; // eq. 3: (B, L, di)
        lap(&mut laps, "mamba conv+silu (tensor ops)")?;
        let (delta, bm, cm) = self.ssm_params(&v)?; // (B, L, di), (B, L, N), (B, L, N)
        lap(&mut laps, "mamba x_proj+dt_proj+softplus")?;
        let a = self.a_log.exp()?.neg()?; // eq. 6: (di, N)
        let fused = match (fused_scan, probe.is_none()) {
            (FusedScan::Train, true) => crate::ops::scan_train::training_scan(&v, &delta, &a, &bm, &cm, &state.ssm)?,
            (FusedScan::Infer, true) if v.device().is_cpu() => {
                Some(crate::ops::scan_cpu_infer::selective_scan(&v, &delta, &a, &bm, &cm, &state.ssm)?)
            }
            _ => None,
        };
        let scan = match fused {
            Some(s) => s,
            None => selective_scan(&v, &delta, &a, &bm, &cm, &state.ssm, probe.is_some())?,
        };
        lap(&mut laps, "mamba scan")?;
        let y = (scan.y + v.broadcast_mul(&self.d)?)?; // eq. 8: (B, L, di)
        let y = (y * candle_nn::ops::silu(&z)?)?; // eq. 9 gate
        lap(&mut laps, "mamba D skip+gate")?;
        let out = self.out_proj.forward(&y.to_dtype(self.out_proj.weight.dtype())?)?; // (B, L, d)
        lap(&mut laps, "mamba out_proj")?;
        if let Some(p) = probe {
            // conv state after token t holds u_{t−K+1..t}: its squared norm is a window sum
            let u2 = u_ext.sqr()?.sum(D::Minus1)?; // (B, L+K−1)
            let mut cn = u2.narrow(1, 0, len)?;
            for tap in 1..k {
                cn = (cn + u2.narrow(1, tap, len)?)?;
            }
            push_host(&mut p.conv_norm, &cn.sqrt()?)?;
            if let Some(hn) = &scan.h_norm {
                push_host(&mut p.ssm_norm, hn)?;
            }
            push_host(&mut p.mean_delta, &delta.mean(D::Minus1)?)?;
        }
        state.conv = new_conv;
        state.ssm = scan.h_last;
        Ok(out)
    }

    /// eqs. 4–5: [δ; B; C] = W_x v, Δ = softplus(W_dt δ + b_dt); all f32 out.
    fn ssm_params(&self, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (dt, bm, cm) = self.ssm_raw(v)?;
        let delta = softplus(&dt.broadcast_add(&self.dt_bias)?)?;
        Ok((delta, bm, cm))
    }

    /// eqs. 4–5 up to the bias: [δ; B; C] = W_x v, dt = W_dt δ (before + b_dt and the softplus);
    /// all f32 out: (.., di), (.., N), (.., N).
    pub fn ssm_raw(&self, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (r, n) = (self.dt_rank, self.d_state);
        let xdbl = self.x_proj.forward(&v.to_dtype(self.x_proj.weight.dtype())?)?; // (.., R+2N)
        let dt = xdbl.narrow(D::Minus1, 0, r)?; // (.., R)
        let bm = xdbl.narrow(D::Minus1, r, n)?.to_dtype(DType::F32)?; // (.., N)
        let cm = xdbl.narrow(D::Minus1, r + n, n)?.to_dtype(DType::F32)?; // (.., N)
        let dt = self.dt_proj.forward(&dt)?.to_dtype(DType::F32)?; // (.., di)
        Ok((dt, bm, cm))
    }

    /// One token: x (B, d) -> (B, d), advancing `state` by one position.
    pub fn step(&self, x: &Tensor, state: &mut LayerState, probe: Option<&mut MambaRecord>) -> Result<Tensor> {
        let (di, k) = (self.d_inner, self.d_conv);
        let xz = self.in_proj.forward(x)?; // (B, 2·di)
        let u = xz.narrow(1, 0, di)?.to_dtype(DType::F32)?; // (B, di)
        let z = xz.narrow(1, di, di)?.to_dtype(DType::F32)?; // (B, di)
                                                             // shift the conv window left by one and append u_t in slot K−1
        let conv = Tensor::cat(&[&state.conv.narrow(2, 1, k - 1)?, &u.unsqueeze(2)?], 2)?; // (B, di, K)
        let c = conv
            .broadcast_mul(&self.conv_w.squeeze(1)?)?
            .sum(D::Minus1)?
            .broadcast_add(&self.conv_b)?; // (B, di)
        let v = candle_nn::ops::silu(&c)?; // (B, di)
        let (delta, bm, cm) = self.ssm_params(&v)?; // (B, di), (B, N), (B, N)
        let a = self.a_log.exp()?.neg()?; // (di, N)
        let da = delta.unsqueeze(2)?.broadcast_mul(&a)?.exp()?; // (B, di, N)
        let db = (&delta * &v)?.unsqueeze(2)?.broadcast_mul(&bm.unsqueeze(1)?)?; // (B, di, N)
        let h = ((da * &state.ssm)? + db)?; // eq. 7
        let y = h.matmul(&cm.unsqueeze(2)?)?.squeeze(2)?; // (B, di): Σ_n h·C
        let y = (y + v.broadcast_mul(&self.d)?)?;
        let y = (y * candle_nn::ops::silu(&z)?)?;
        let out = self.out_proj.forward(&y.to_dtype(self.out_proj.weight.dtype())?)?; // (B, d)
        if let Some(p) = probe {
            push_host(&mut p.ssm_norm, &h.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?.sqrt()?)?;
            push_host(&mut p.conv_norm, &conv.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?.sqrt()?)?;
            push_host(&mut p.mean_delta, &delta.mean(D::Minus1)?)?;
        }
        state.conv = conv;
        state.ssm = h;
        Ok(out)
    }
}

/// Appends a small tensor's values (any shape, flattened) to a host vector.
fn push_host(dst: &mut Vec<f32>, t: &Tensor) -> Result<()> {
    dst.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    Ok(())
}
