//! The megakernel on a GPU (`kernels/megakernel.cu`): a [`Schedule`] built for the device's SM
//! count, its instruction words and the weights (in the schedule's [`FormatPlan`], split-K
//! matrices transposed as [`HostWeights`] lays them out) uploaded once, the per-layer buffers,
//! split-K accumulators and counters allocated zeroed, then one cooperative launch per token.
//!
//! First version: bf16 and f32 weight tiles (other formats are refused with a one-line error),
//! logits and routes copied to the host after each token (no device sampler yet). Not yet run on
//! a GPU: `tests/megakernel_gpu.rs` is its parity test against [`Model::step`].
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::ops::cuda::{cuda_device, dptr, func, sm_count, Launch, Module};
use crate::ops::params::{to_i32, MegakernelParams};

use super::host::{HostState, HostWeights, LayerW, MlpW};
use super::interp::{RouteOut, TokenOut};
use super::isa::WeightFormat;
use super::pack::pack;
use super::schedule::{FormatPlan, Schedule, ScheduleOpts, TileSizes};

/// Threads per block (`MK_THREADS` in the kernel).
const THREADS: u32 = 256;
/// u64 words per layer table (`MK_LT`).
const LT: usize = 16;
/// 8-byte words of `MkParams` (a static_assert in the kernel holds the same number).
const PARAMS_WORDS: usize = 29;
/// Shared memory a block may take without opting in to more.
const SMEM_LIMIT: usize = 48 * 1024;

/// What to build a [`MegaDecoder`] with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MegaOpts {
    /// Persistent blocks; `None` is the device's SM count.
    pub sms: Option<usize>,
    pub tiles: TileSizes,
    pub formats: FormatPlan,
    /// Clock cycles a wait may spin before the kernel gives up with an error (about 2 s at 2 GHz).
    pub timeout_cycles: i64,
}

impl Default for MegaOpts {
    fn default() -> Self {
        Self {
            sms: None,
            tiles: TileSizes::default(),
            formats: FormatPlan::default(),
            timeout_cycles: 4_000_000_000,
        }
    }
}

fn err(msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("megakernel: {msg}"))
}

fn not_in_kernel(f: WeightFormat) -> Error {
    err(format!(
        "weight format {f:?} is not yet in the CUDA kernel (bf16 and f32 are); pick --formats bf16 or f32"
    ))
}

/// One token's decode as one kernel launch (see the module docs).
pub struct MegaDecoder {
    stream: Arc<CudaStream>,
    schedule: Schedule,
    launch_base: Launch,
    /// The device address of the kernel's parameter block (in `_hold`).
    params_p: u64,
    /// Every device allocation the kernel addresses (kept alive while the decoder lives).
    _hold: Vec<Tensor>,
    logits: Tensor,
    route: Tensor,
    err: Tensor,
    /// Per half-block (conv window, SSM state) of the Mamba layers.
    states: Vec<Option<(Tensor, Tensor)>>,
    route_stride: usize,
    /// Tokens run since the buffers were made: the counters' epoch and the accumulators' parity.
    epoch: u32,
    /// Set when a launch reported an error: the counters no longer match the epoch.
    broken: Option<String>,
}

fn upload_f32(v: &[f32], dev: &Device, hold: &mut Vec<Tensor>) -> Result<u64> {
    let t = Tensor::from_slice(v, v.len(), dev)?;
    let p = dptr(&t)?;
    hold.push(t);
    Ok(p)
}

fn upload_opt(v: Option<&Vec<f32>>, dev: &Device, hold: &mut Vec<Tensor>) -> Result<u64> {
    v.map_or(Ok(0), |v| upload_f32(v, dev, hold))
}

/// A (rows, cols) matrix packed in `fmt`, uploaded as bytes.
fn upload_packed(v: &[f32], rows: usize, cols: usize, fmt: WeightFormat, dev: &Device, hold: &mut Vec<Tensor>) -> Result<u64> {
    if !matches!(fmt, WeightFormat::F32 | WeightFormat::Bf16) {
        return Err(not_in_kernel(fmt));
    }
    let bytes = pack(v, rows, cols, fmt)?;
    let t = Tensor::from_vec(bytes, rows * cols * if fmt == WeightFormat::F32 { 4 } else { 2 }, dev)?;
    let p = dptr(&t)?;
    hold.push(t);
    Ok(p)
}

fn zeros(n: usize, dtype: DType, dev: &Device, hold: &mut Vec<Tensor>) -> Result<(Tensor, u64)> {
    let t = Tensor::zeros(n.max(1), dtype, dev)?;
    let p = dptr(&t)?;
    hold.push(t.clone());
    Ok((t, p))
}

fn i64s(v: &[u64]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

fn upload_table(v: &[u64], dev: &Device, hold: &mut Vec<Tensor>) -> Result<u64> {
    let t = Tensor::from_vec(i64s(v), v.len(), dev)?;
    let p = dptr(&t)?;
    hold.push(t);
    Ok(p)
}

/// An expert's (or dense MLP's) four table words: fc1, its bias, fc2ᵀ, its bias.
fn mlp_words(m: &MlpW, cfg: &crate::model::config::Config, f: &FormatPlan, dev: &Device, hold: &mut Vec<Tensor>) -> Result<[u64; 4]> {
    let (d, ffn) = (cfg.hidden_size, cfg.ffn_hidden_size);
    Ok([
        upload_packed(&m.fc1, cfg.fc1_rows(), d, f.fc1, dev, hold)?,
        upload_opt(m.fc1_b.as_ref(), dev, hold)?,
        upload_packed(&m.fc2_t, ffn, d, f.fc2, dev, hold)?,
        upload_opt(m.fc2_b.as_ref(), dev, hold)?,
    ])
}

impl MegaDecoder {
    /// Whether the kernel can take `model` with `formats`; `Err` says what stands in the way.
    pub fn supports(model: &Model, dev: &Device, formats: &FormatPlan) -> std::result::Result<(), String> {
        if !dev.is_cuda() {
            return Err("the megakernel runs on a CUDA device".into());
        }
        let all = [
            formats.in_proj,
            formats.x_proj,
            formats.dt_proj,
            formats.out_proj,
            formats.fc1,
            formats.fc2,
            formats.head,
        ];
        if let Some(f) = all.iter().find(|f| !matches!(f, WeightFormat::F32 | WeightFormat::Bf16)) {
            return Err(not_in_kernel(*f).to_string());
        }
        let cfg = &model.cfg;
        let floats = cfg.hidden_size + cfg.x_proj_rows().max(cfg.moe_layers().iter().map(|m| m.1).max().unwrap_or(1)) + 40;
        if 4 * floats > SMEM_LIMIT / 2 {
            return Err(format!(
                "hidden size {} leaves too little shared memory for a tile (the kernel keeps the normed residual there)",
                cfg.hidden_size
            ));
        }
        Ok(())
    }

    /// Builds the schedule for CUDA device `dev` and uploads everything the kernel reads there
    /// (`model` may live anywhere: its weights are copied through the host).
    pub fn new(model: &Model, dev: &Device, opts: &MegaOpts) -> Result<Self> {
        Self::supports(model, dev, &opts.formats).map_err(err)?;
        let cfg = &model.cfg;
        let cdev: &CudaDevice = cuda_device(dev)?;
        let sms = match opts.sms {
            Some(s) => s,
            None => sm_count(cdev)? as usize,
        };
        let schedule = Schedule::build(
            cfg,
            &ScheduleOpts {
                sms,
                tiles: opts.tiles,
                formats: opts.formats,
            },
        )?;
        super::validate(&schedule, &[])?;
        let w = HostWeights::from_model(model)?;
        let f = &opts.formats;
        let (d, di, n, k, xr, r) = (
            cfg.hidden_size,
            cfg.d_inner(),
            cfg.state_size,
            cfg.conv_dimension,
            cfg.x_proj_rows(),
            cfg.dt_rank(),
        );
        let nl = cfg.num_layers;
        let mut hold = Vec::new();
        let mut tables = vec![0u64; nl.max(1) * LT];
        let mut states = Vec::with_capacity(nl);
        let mut e_max = 1usize;
        for (i, layer) in w.layers.iter().enumerate() {
            let t = &mut tables[i * LT..(i + 1) * LT];
            match layer {
                LayerW::Mamba(m) => {
                    t[0] = upload_f32(&m.norm, dev, &mut hold)?;
                    t[1] = upload_packed(&m.in_w, 2 * di, d, f.in_proj, dev, &mut hold)?;
                    t[2] = upload_opt(m.in_b.as_ref(), dev, &mut hold)?;
                    t[3] = upload_f32(&m.conv_w, dev, &mut hold)?;
                    t[4] = upload_f32(&m.conv_b, dev, &mut hold)?;
                    t[5] = upload_packed(&m.x_t, di, xr, f.x_proj, dev, &mut hold)?;
                    t[6] = upload_packed(&m.dt_w, di, r, f.dt_proj, dev, &mut hold)?;
                    t[7] = upload_f32(&m.dt_b, dev, &mut hold)?;
                    t[8] = upload_f32(&m.a, dev, &mut hold)?;
                    t[9] = upload_f32(&m.d_skip, dev, &mut hold)?;
                    t[10] = upload_packed(&m.out_t, di, d, f.out_proj, dev, &mut hold)?;
                    t[11] = upload_opt(m.out_b.as_ref(), dev, &mut hold)?;
                    let (conv, pc) = zeros(di * k, DType::F32, dev, &mut hold)?;
                    let (ssm, ps) = zeros(di * n, DType::F32, dev, &mut hold)?;
                    (t[12], t[13]) = (pc, ps);
                    states.push(Some((conv, ssm)));
                }
                LayerW::Moe {
                    norm,
                    router_w,
                    router_b,
                    experts,
                } => {
                    t[0] = upload_f32(norm, dev, &mut hold)?;
                    t[1] = upload_f32(router_w, dev, &mut hold)?;
                    t[2] = upload_f32(router_b, dev, &mut hold)?;
                    let mut ex = Vec::with_capacity(4 * experts.len());
                    for e in experts {
                        ex.extend(mlp_words(e, cfg, f, dev, &mut hold)?);
                    }
                    t[3] = upload_table(&ex, dev, &mut hold)?;
                    t[4] = experts.len() as u64;
                    e_max = e_max.max(experts.len());
                    states.push(None);
                }
                LayerW::Dense { norm, mlp } => {
                    t[0] = upload_f32(norm, dev, &mut hold)?;
                    t[3] = upload_table(&mlp_words(mlp, cfg, f, dev, &mut hold)?, dev, &mut hold)?;
                    t[4] = 1;
                    states.push(None);
                }
            }
        }
        let emb = upload_packed(&w.emb, cfg.vocab_size, d, f.head, dev, &mut hold)?;
        let final_w = upload_f32(&w.final_w, dev, &mut hold)?;
        let final_b = upload_f32(&w.final_b, dev, &mut hold)?;
        let route_stride = 1 + e_max;
        let (_, res) = zeros(2 * (nl + 1) * d, DType::F32, dev, &mut hold)?;
        let (_, xdbc) = zeros(2 * nl * xr, DType::F32, dev, &mut hold)?;
        let (_, v) = zeros(nl * di, DType::F32, dev, &mut hold)?;
        let (_, z) = zeros(nl * di, DType::F32, dev, &mut hold)?;
        let (route, route_p) = zeros(nl * route_stride, DType::F32, dev, &mut hold)?;
        let (logits, logits_p) = zeros(cfg.vocab_size, DType::F32, dev, &mut hold)?;
        let (_, counters) = zeros(schedule.counters.len(), DType::U32, dev, &mut hold)?;
        let (err_t, err_p) = zeros(8, DType::U32, dev, &mut hold)?;
        // the lists back to back and each SM's offset
        let mut words = Vec::new();
        let mut offs = vec![0u32];
        let mut max_rows = 1usize;
        for list in schedule.encode()? {
            for e in &list {
                words.extend_from_slice(&e.words);
            }
            offs.push((words.len() / super::isa::WORDS) as u32);
        }
        for i in schedule.lists.iter().flatten() {
            if i.op != super::OpKind::Head {
                max_rows = max_rows.max((i.rows.1 - i.rows.0) as usize);
            }
        }
        let words_t = Tensor::from_vec(words, offs.last().copied().unwrap_or(0) as usize * super::isa::WORDS, dev)?;
        let offs_t = Tensor::from_vec(offs, sms + 1, dev)?;
        let tables_p = upload_table(&tables, dev, &mut hold)?;
        let instrs = dptr(&words_t)?;
        let list_off = dptr(&offs_t)?;
        hold.extend([words_t, offs_t]);
        let act = match cfg.expert_activation {
            crate::model::config::Activation::Gelu => 0u64,
            crate::model::config::Activation::Silu => 1,
        };
        // MkParams: 14 pointers, then 14 sizes, then eps (f64 bits)
        let head_fmt = u64::from(f.head.code());
        let mut params: Vec<u64> = vec![
            tables_p, emb, final_w, final_b, res, xdbc, v, z, route_p, logits_p, counters, err_p, instrs, list_off,
        ];
        params.extend(
            [
                d,
                di,
                n,
                r,
                k,
                xr,
                cfg.ffn_hidden_size,
                cfg.vocab_size,
                nl,
                route_stride,
                usize::from(cfg.swiglu),
            ]
            .map(|x| x as u64),
        );
        params.extend([act, head_fmt, opts.timeout_cycles.max(1) as u64, cfg.layernorm_epsilon.to_bits()]);
        if params.len() != PARAMS_WORDS {
            return Err(err(format!("{} parameter words, the kernel reads {PARAMS_WORDS}", params.len())));
        }
        let params_p = upload_table(&params, dev, &mut hold)?;
        let aux_n = xr.max(e_max);
        let smem = 4 * (d + aux_n + max_rows + 40);
        if smem > SMEM_LIMIT {
            return Err(err(format!(
                "a block needs {smem} bytes of shared memory (d {d}, tile rows {max_rows}); the kernel takes at most \
                 {SMEM_LIMIT}: use more SMs or smaller tiles"
            )));
        }
        let launch_base = Launch::new(
            func(cdev, Module::Megakernel, "megakernel")?,
            (sms as u32, 1, 1),
            THREADS,
            smem as u32,
        )
        .cooperative(true)
        .label("megakernel");
        Ok(Self {
            stream: cdev.cuda_stream(),
            schedule,
            launch_base,
            params_p,
            _hold: hold,
            logits,
            route,
            err: err_t,
            states,
            route_stride,
            epoch: 0,
            broken: None,
        })
    }

    /// The schedule the kernel runs.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Decodes `token`: one launch, then the logits and routes copied to the host.
    pub fn step(&mut self, token: u32) -> Result<TokenOut> {
        let cfg = &self.schedule.cfg;
        if let Some(b) = &self.broken {
            return Err(err(format!("an earlier token failed ({b}); build a new decoder")));
        }
        if token as usize >= cfg.vocab_size {
            return Err(Error::TokenOutOfVocab {
                id: token,
                vocab: cfg.vocab_size,
            });
        }
        let d = cfg.hidden_size;
        let aux_n = cfg.x_proj_rows().max(self.route_stride - 1);
        let smem = self.launch_base.smem as usize / 4;
        let rows_n = smem - 40 - d - aux_n;
        let launch = self.launch_base.clone().params(MegakernelParams {
            params: self.params_p,
            token,
            epoch: self.epoch,
            aux_n: to_i32(aux_n, "megakernel: aux size")?,
            rows_n: to_i32(rows_n, "megakernel: tile rows")?,
        });
        // SAFETY: MegakernelParams is the kernel's argument; the params block and every pointer in it (weights,
        // tables, buffers, counters, instruction words) are device allocations held in
        // `self._hold` with the sizes the kernel indexes (documented in kernels/megakernel.cu),
        // and the dynamic shared memory is d + aux_n + rows_n + 40 floats as the kernel carves it.
        unsafe { launch.run(&self.stream) }?;
        self.epoch = self.epoch.wrapping_add(1);
        let e = self.err.to_vec1::<u32>()?;
        if e[0] != 0 {
            let why = match e[0] {
                1 => format!(
                    "a wait timed out on SM {} (instruction {}, {} at {} of {})",
                    e[1],
                    e[2],
                    self.schedule.counter_name(e[3]),
                    e[4],
                    e[5]
                ),
                2 => format!("SM {} met a weight format the kernel lacks (instruction {})", e[1], e[2]),
                c => format!("error code {c} on SM {} (instruction {})", e[1], e[2]),
            };
            self.broken = Some(why.clone());
            return Err(err(why));
        }
        let logits = self.logits.to_vec1::<f32>()?;
        let route = self.route.to_vec1::<f32>()?;
        let mut routes = Vec::new();
        for (l, experts) in cfg.moe_layers() {
            let o = l * self.route_stride;
            routes.push(RouteOut {
                layer: l,
                expert: route[o].to_bits(),
                probs: route[o + 1..o + 1 + experts].to_vec(),
            });
        }
        Ok(TokenOut { logits, routes })
    }

    /// The recurrent state (copies).
    pub fn state(&self) -> Result<HostState> {
        let mut out = HostState::zeros(&self.schedule.cfg);
        for (i, s) in self.states.iter().enumerate() {
            if let Some((c, h)) = s {
                out.conv[i] = c.to_vec1::<f32>()?;
                out.ssm[i] = h.to_vec1::<f32>()?;
            }
        }
        Ok(out)
    }

    /// Loads a recurrent state (e.g. after a prefill).
    pub fn load_state(&mut self, st: &HostState) -> Result<()> {
        for (i, s) in self.states.iter().enumerate() {
            if let Some((c, h)) = s {
                let (sc, sh) = (&st.conv[i], &st.ssm[i]);
                if sc.len() != c.elem_count() || sh.len() != h.elem_count() {
                    return Err(err(format!("the state of layer {i} does not match the model")));
                }
                c.slice_set(&Tensor::from_slice(sc, sc.len(), c.device())?, 0, 0)?;
                h.slice_set(&Tensor::from_slice(sh, sh.len(), h.device())?, 0, 0)?;
            }
        }
        Ok(())
    }
}
