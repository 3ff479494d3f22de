//! The megakernel's slow twin: a [`Schedule`]'s lists executed on the CPU, one token at a time,
//! in a simulated interleaving of the SMs ([`super::validate::interleave`]), on f32 host
//! buffers, with the tile arithmetic the kernel will do: redundant per-tile norms and routers,
//! split-K partial sums added into the shared vectors in the order the tiles happen to finish,
//! the conv window in in_proj's epilogue, dt_proj + state update + D skip + gate in one tile.
//!
//! Each tile only touches the ranges [`super::validate::accesses`] lists for it, so a schedule
//! the validator accepts gives the same values under any interleaving, up to the order of the
//! split-K additions (f32 rounding).

use crate::error::{Error, Result};
use crate::model::config::{Activation, Config, LayerKind};

use super::host::{HostState, HostWeights, LayerW, MambaW, MlpW};
use super::isa::{Instr, OpKind};
use super::schedule::Schedule;
use super::validate::interleave;

/// One MoE layer's decision for a token.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOut {
    /// Half-block index.
    pub layer: usize,
    pub expert: u32,
    /// σ(router logit) of every expert.
    pub probs: Vec<f32>,
}

/// What one token produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    /// (vocab) f32
    pub logits: Vec<f32>,
    /// One per MoE layer, in layer order.
    pub routes: Vec<RouteOut>,
}

/// The kernel's global buffers (see [`super::validate::Buf`]). The split-K accumulators come
/// in two sets, by token parity: token t adds into set t % 2 and each adding tile zeroes its
/// slice of the same vector in the other set, which no instruction of token t touches and which
/// token t + 1 (launched after token t ends) adds into. No memset, no host work per token.
struct Arena {
    res: [Vec<Vec<f32>>; 2],
    xdbc: [Vec<Vec<f32>>; 2],
    v: Vec<Vec<f32>>,
    z: Vec<Vec<f32>>,
    route: Vec<Option<RouteOut>>,
    logits: Vec<f32>,
}

/// Runs a [`Schedule`] on [`HostWeights`], token after token.
pub struct Interpreter<'a> {
    s: &'a Schedule,
    w: &'a HostWeights,
    arena: Arena,
    /// The dependency counters, monotonic across tokens (never reset).
    counters: Vec<u64>,
    /// Tokens decoded so far: the epoch of the counters and the parity of the accumulators.
    tokens: u64,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    x.iter().zip(w).map(|(v, a)| v / m * a).collect()
}

fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let n = x.len() as f32;
    let (sum, sum2) = x.iter().fold((0f32, 0f32), |(s, s2), v| (s + v, s2 + v * v));
    let mean = sum / n;
    let inv_std = (sum2 / n - mean * mean + eps).sqrt().recip();
    x.iter()
        .zip(w.iter().zip(b))
        .map(|(v, (a, c))| (v - mean) * inv_std * a + c)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// softplus as `model::linear::softplus` computes it (Goldberg's log1p).
fn softplus(x: f32) -> f32 {
    let y = (-x.abs()).exp();
    let u = y + 1.0;
    let d = u - 1.0;
    let ratio = if d == 0.0 { y } else { u.ln() * (y / d) };
    x.max(0.0) + ratio
}

fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x,
        Activation::Silu => silu(x),
    }
}

/// Tile `tile` of `tiles`'s share of an n-vector it zeroes for the next token.
fn share(tile: u32, tiles: u32, n: usize) -> std::ops::Range<usize> {
    let (t, k) = (tile as usize, tiles.max(1) as usize);
    t * n / k..(t + 1) * n / k
}

/// dst += src (the kernel's `red.global.add.f32`).
fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

impl<'a> Interpreter<'a> {
    /// An interpreter of `s` over `w`, which must be the weights of `s.cfg`.
    pub fn new(s: &'a Schedule, w: &'a HostWeights) -> Result<Self> {
        let cfg = &s.cfg;
        let (d, di) = (cfg.hidden_size, cfg.d_inner());
        let fits = w.layers.len() == cfg.num_layers
            && w.emb.len() == cfg.vocab_size * d
            && w.layers.iter().enumerate().all(|(i, l)| match (l, cfg.layer_kind(i)) {
                (LayerW::Mamba(m), LayerKind::Mamba) => m.in_w.len() == 2 * di * d && m.out_t.len() == di * d,
                (LayerW::Moe { experts, .. }, LayerKind::Moe { experts: e }) => experts.len() == e,
                (LayerW::Dense { .. }, LayerKind::Dense) => true,
                _ => false,
            });
        if !fits {
            return Err(Error::Invalid("megakernel: the weights do not match the schedule's config".into()));
        }
        if w.formats != s.opts.formats {
            return Err(Error::Invalid(format!(
                "megakernel: the weights are stored as {:?} but the schedule streams {:?}; pack them with \
                 HostWeights::from_model_in and the schedule's formats",
                w.formats, s.opts.formats
            )));
        }
        let per_layer = |n: usize| (0..cfg.num_layers).map(|_| vec![0.0; n]).collect::<Vec<_>>();
        let res = || (0..=cfg.num_layers).map(|_| vec![0.0; d]).collect::<Vec<_>>();
        let arena = Arena {
            res: [res(), res()],
            xdbc: [per_layer(cfg.x_proj_rows()), per_layer(cfg.x_proj_rows())],
            v: per_layer(di),
            z: per_layer(di),
            route: vec![None; cfg.num_layers],
            logits: vec![0.0; cfg.vocab_size],
        };
        Ok(Self {
            s,
            w,
            arena,
            counters: vec![0; s.counters.len()],
            tokens: 0,
        })
    }

    /// Decodes `token`, advancing `state`, with the SMs interleaved as drawn from `seed`.
    pub fn step(&mut self, token: u32, state: &mut HostState, seed: u64) -> Result<TokenOut> {
        let cfg = &self.s.cfg;
        let d = cfg.hidden_size;
        let t = token as usize;
        if t >= cfg.vocab_size {
            return Err(Error::TokenOutOfVocab {
                id: token,
                vocab: cfg.vocab_size,
            });
        }
        if state.conv.len() != cfg.num_layers || state.ssm.len() != cfg.num_layers {
            return Err(Error::Invalid("megakernel: the state does not match the schedule's config".into()));
        }
        // what the host (later the sampler) provides: the token's embedding row as the residual
        // into layer 0; the plain-store buffers are poisoned so that a row no tile writes shows
        let p = (self.tokens % 2) as usize;
        let a = &mut self.arena;
        a.res[p][0].copy_from_slice(&self.w.emb[t * d..(t + 1) * d]);
        a.route.iter_mut().for_each(|r| *r = None);
        a.v.iter_mut()
            .chain(a.z.iter_mut())
            .chain([&mut a.logits])
            .for_each(|v| v.fill(f32::NAN));
        let (w, arena) = (self.w, &mut self.arena);
        interleave(self.s, seed, &mut self.counters, self.tokens, |_, _, i| {
            exec(cfg, w, arena, state, i, p)
        })?;
        self.tokens += 1;
        let mut routes = Vec::new();
        for (l, _) in cfg.moe_layers() {
            let r = arena.route[l]
                .take()
                .ok_or_else(|| Error::Invalid(format!("megakernel: no tile wrote the route of MoE layer {l}")))?;
            routes.push(r);
        }
        Ok(TokenOut {
            logits: arena.logits.clone(),
            routes,
        })
    }
}

/// One instruction on the host buffers; `p` is the token's parity.
fn exec(cfg: &Config, w: &HostWeights, a: &mut Arena, st: &mut HostState, i: &Instr, p: usize) -> Result<()> {
    let l = i.layer as usize;
    let rows = i.rows.0 as usize..i.rows.1 as usize;
    let eps = cfg.layernorm_epsilon as f32;
    let first = i.tile == 0;
    match (i.op, w.layers.get(l)) {
        (OpKind::MambaIn, Some(LayerW::Mamba(m))) => {
            a.xdbc[1 - p][l][share(i.tile, i.tiles, cfg.x_proj_rows())].fill(0.0);
            mamba_in(cfg, m, a, st, l, rows, eps, p)
        }
        (OpKind::MambaSsm, Some(LayerW::Mamba(m))) => {
            a.res[1 - p][l + 1][share(i.tile, i.tiles, cfg.hidden_size)].fill(0.0);
            mamba_ssm(cfg, m, a, st, l, rows, first, p)
        }
        (
            OpKind::MoeFfn,
            Some(LayerW::Moe {
                norm,
                router_w,
                router_b,
                experts,
            }),
        ) => {
            a.res[1 - p][l + 1][share(i.tile, i.tiles, cfg.hidden_size)].fill(0.0);
            let x = rms_norm(&a.res[p][l], norm, eps);
            // the router, redundant in every tile (every tile reaches the same argmax bitwise)
            let logits: Vec<f32> = router_b
                .iter()
                .enumerate()
                .map(|(e, b)| dot(&router_w[e * x.len()..(e + 1) * x.len()], &x) + b)
                .collect();
            let mut best = 0;
            for (e, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = e;
                }
            }
            let probs: Vec<f32> = logits.iter().map(|&v| sigmoid(v)).collect();
            let gate = probs[best];
            if first {
                a.route[l] = Some(RouteOut {
                    layer: l,
                    expert: best as u32,
                    probs,
                });
            }
            ffn(cfg, w.act, &experts[best], &mut a.res[p], l, &x, rows, first, gate);
            Ok(())
        }
        (OpKind::DenseFfn, Some(LayerW::Dense { norm, mlp })) => {
            a.res[1 - p][l + 1][share(i.tile, i.tiles, cfg.hidden_size)].fill(0.0);
            let x = rms_norm(&a.res[p][l], norm, eps);
            ffn(cfg, w.act, mlp, &mut a.res[p], l, &x, rows, first, 1.0);
            Ok(())
        }
        (OpKind::Head, _) if l == cfg.num_layers => {
            let x = layer_norm(&a.res[p][l], &w.final_w, &w.final_b, eps);
            let d = x.len();
            for r in rows {
                a.logits[r] = dot(&w.emb[r * d..(r + 1) * d], &x);
            }
            Ok(())
        }
        _ => Err(Error::Invalid(format!(
            "megakernel: {} does not fit the model's layer {l}",
            i.describe()
        ))),
    }
}

/// Stage 1 of a Mamba layer for channels `rows`: norm, in_proj u/z, conv window + conv + SiLU,
/// x_proj partial sums.
#[allow(clippy::too_many_arguments)]
fn mamba_in(
    cfg: &Config,
    m: &MambaW,
    a: &mut Arena,
    st: &mut HostState,
    l: usize,
    rows: std::ops::Range<usize>,
    eps: f32,
    p: usize,
) -> Result<()> {
    let (d, di, k) = (cfg.hidden_size, cfg.d_inner(), cfg.conv_dimension);
    let xr = cfg.x_proj_rows();
    let x = rms_norm(&a.res[p][l], &m.norm, eps);
    let conv = &mut st.conv[l];
    let mut part = vec![0f32; xr];
    for c in rows {
        let bias = |r: usize| m.in_b.as_ref().map_or(0.0, |b| b[r]);
        let u = dot(&m.in_w[c * d..(c + 1) * d], &x) + bias(c);
        let z = dot(&m.in_w[(di + c) * d..(di + c + 1) * d], &x) + bias(di + c);
        let win = &mut conv[c * k..(c + 1) * k];
        win.copy_within(1.., 0);
        win[k - 1] = u;
        let cv = dot(win, &m.conv_w[c * k..(c + 1) * k]) + m.conv_b[c];
        let v = silu(cv);
        a.v[l][c] = v;
        a.z[l][c] = z;
        part.iter_mut().zip(&m.x_t[c * xr..(c + 1) * xr]).for_each(|(p, wx)| *p += wx * v);
    }
    add_into(&mut a.xdbc[p][l], &part);
    Ok(())
}

/// Stage 2 of a Mamba layer for channels `rows`: dt_proj + softplus, the state update, C, D
/// skip, SiLU(z) gate, out_proj partial sums into the next residual (tile 0 adds the residual
/// and the bias).
#[allow(clippy::too_many_arguments)]
fn mamba_ssm(
    cfg: &Config,
    m: &MambaW,
    a: &mut Arena,
    st: &mut HostState,
    l: usize,
    rows: std::ops::Range<usize>,
    first: bool,
    p: usize,
) -> Result<()> {
    let (d, n, r) = (cfg.hidden_size, cfg.state_size, cfg.dt_rank());
    let xd = &a.xdbc[p][l];
    let (dt_in, bm, cm) = (&xd[..r], &xd[r..r + n], &xd[r + n..r + 2 * n]);
    let h = &mut st.ssm[l];
    let mut part = if first {
        let mut r0 = a.res[p][l].clone();
        if let Some(b) = &m.out_b {
            add_into(&mut r0, b);
        }
        r0
    } else {
        vec![0f32; d]
    };
    for c in rows {
        let delta = softplus(dot(&m.dt_w[c * r..(c + 1) * r], dt_in) + m.dt_b[c]);
        let v = a.v[l][c];
        let mut y = 0f32;
        for s in 0..n {
            let hs = &mut h[c * n + s];
            *hs = (delta * m.a[c * n + s]).exp() * *hs + delta * v * bm[s];
            y += *hs * cm[s];
        }
        let y = (y + v * m.d_skip[c]) * silu(a.z[l][c]);
        part.iter_mut().zip(&m.out_t[c * d..(c + 1) * d]).for_each(|(p, wo)| *p += wo * y);
    }
    add_into(&mut a.res[p][l + 1], &part);
    Ok(())
}

/// An expert's (or dense MLP's) hidden units `rows`: fc1 rows, the activation (gated or not),
/// fc2 partial sums scaled by the gate into the next residual (tile 0 adds the residual and the
/// gated fc2 bias).
#[allow(clippy::too_many_arguments)]
fn ffn(
    cfg: &Config,
    act: Activation,
    e: &MlpW,
    res: &mut [Vec<f32>],
    l: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    first: bool,
    gate: f32,
) {
    let (d, f) = (cfg.hidden_size, cfg.ffn_hidden_size);
    let bias = |r: usize| e.fc1_b.as_ref().map_or(0.0, |b| b[r]);
    let mut part = vec![0f32; d];
    if first {
        if let Some(b) = &e.fc2_b {
            part.copy_from_slice(b);
        }
    }
    for j in rows {
        let g = dot(&e.fc1[j * d..(j + 1) * d], x) + bias(j);
        let h = if cfg.swiglu {
            activate(act, g) * (dot(&e.fc1[(f + j) * d..(f + j + 1) * d], x) + bias(f + j))
        } else {
            activate(act, g)
        };
        part.iter_mut().zip(&e.fc2_t[j * d..(j + 1) * d]).for_each(|(p, w2)| *p += w2 * h);
    }
    part.iter_mut().for_each(|p| *p *= gate);
    if first {
        add_into(&mut part, &res[l]);
    }
    add_into(&mut res[l + 1], &part);
}
