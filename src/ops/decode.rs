//! The batch-1 decode step as a fixed list of kernel launches over static buffers (kernels in
//! `kernels/decode.cu` and `kernels/mamba_step.cu`), run eagerly or captured once as a CUDA graph
//! and replayed. The sampled token stays on the device as the next step's input; only one small
//! buffer (the token id and, with the probe on, the telemetry) is copied to pinned host memory,
//! by one asynchronous copy per token.
//!
//! Per token: embed; per Mamba layer in_proj(+RMSNorm, +conv window) → x_proj → dt_proj+scan step+gate →
//! out_proj(+residual); per MoE layer router(+RMSNorm, top-1) and the chosen expert's fc1
//! (+activation) in one kernel → fc2(+gate, +residual); head(+LayerNorm, +argmax candidates) →
//! final argmax.
//! The slow twin is [`Model::step`] with host sampling; `tests/gpu_parity.rs` compares them.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{result as cu, CudaEvent, CudaGraph, CudaStream};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::probe::{MambaRecord, MoeRecord, Probe};
use crate::model::state::{LayerState, State};
use crate::model::{Mixer, Model};
use crate::ops::cuda::{cuda_device, dptr, func, sm_count, suffix, Launch, Module};

/// Launch shapes and sampling of a [`Decoder`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeOpts {
    /// Threads per block of the matrix-vector kernels (a multiple of 32).
    pub threads: u32,
    /// Cap of blocks per multiprocessor for the matrix-vector kernels (their blocks loop over rows).
    pub blocks_per_sm: u32,
    /// K slices of the residual products (out_proj, fc2); 0 is 2.
    pub split_k: u32,
    /// Gather telemetry (router logits and choice, state norms) and copy it with the token.
    pub probe: bool,
    /// 0: greedy; else sample softmax(logits / temperature) on device (Gumbel-max).
    pub temperature: f32,
    pub seed: u64,
    /// Programmatic dependent launch: each kernel starts while the previous one finishes.
    pub pdl: bool,
    /// Kernels ask L2 for all their weight rows before waiting for the previous kernel.
    pub prefetch: bool,
    /// Kernels load the start of their first weight row into registers before waiting for the
    /// previous kernel (variants `*_pre_*`, more registers per thread).
    pub preload: bool,
}

impl Default for DecodeOpts {
    fn default() -> Self {
        Self {
            threads: 256,
            blocks_per_sm: 8,
            split_k: 0,
            probe: false,
            temperature: 0.0,
            seed: 0,
            pdl: true,
            prefetch: false,
            preload: false,
        }
    }
}

/// Threads per block of the SSM step (one warp per channel).
const SSM_THREADS: u32 = 512;

/// Device pointers of one half-block.
#[derive(Debug, Clone)]
enum LayerPtrs {
    Mamba {
        norm: u64,
        in_w: u64,
        in_b: u64,
        conv_w: u64,
        conv_b: u64,
        x_w: u64,
        dt_w: u64,
        dt_b: u64,
        a_log: u64,
        d: u64,
        out_w: u64,
        out_b: u64,
        slot: usize,
    },
    Moe {
        norm: u64,
        router_w: u64,
        router_b: u64,
        n_experts: usize,
        slot: usize,
    },
}

/// The decode step of one model, for one sequence.
pub struct Decoder {
    dev: CudaDevice,
    dtype: DType,
    stream: Arc<CudaStream>,
    opts: DecodeOpts,
    sizes: Sizes,
    layers: Vec<LayerPtrs>,
    /// Weights and buffers whose device memory the launches address.
    _hold: Vec<Tensor>,
    bufs: Bufs,
    /// launches[slot]: the step writing its output words to out slot `slot`
    launches: [Vec<Launch>; 2],
    graphs: [Option<CudaGraph>; 2],
    host: PinnedWords,
    /// Words copied to the host per step (1 without the probe).
    n_words: usize,
    /// Mamba layer indices (for telemetry records) and MoE layer indices with expert counts.
    mamba_idx: Vec<usize>,
    moe_idx: Vec<(usize, usize)>,
    /// Steps run since the last token was set.
    pub steps: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    d: usize,
    di: usize,
    n: usize,
    r: usize,
    k: usize,
    f: usize,
    vocab: usize,
    es: usize,
    gated: bool,
    act: i32,
    eps: f32,
    sms: u32,
    head_blocks: u32,
    ssm_blocks: u32,
}

struct Bufs {
    tok: u64,
    step: u64,
    out: [u64; 2],
    res: u64,
    xz: u64,
    dbc: u64,
    v: u64,
    y: u64,
    h: u64,
    route: u64,
    logits: u64,
    pv: u64,
    pi: u64,
    parts: u64,
    conv: u64,
    ssm: u64,
    table: u64,
    emb: u64,
    final_w: u64,
    final_b: u64,
}

/// Page-locked host memory for the per-step words (two slots).
struct PinnedWords {
    ptr: *mut u32,
    len: usize,
}

impl PinnedWords {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: plain page-locked allocation of `len` u32; freed in Drop.
        let p = unsafe { cu::malloc_host(len * 4, 0) }.w()?;
        // SAFETY: fresh allocation of len·4 bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len * 4) };
        Ok(Self { ptr: p.cast(), len })
    }
    fn slice(&self, start: usize, n: usize) -> &[u32] {
        let n = n.min(self.len.saturating_sub(start));
        // SAFETY: in bounds of the allocation; callers read only after synchronising with the copy.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), n) }
    }
    fn slice_mut(&mut self, start: usize, n: usize) -> &mut [u32] {
        let n = n.min(self.len.saturating_sub(start));
        // SAFETY: as above; the device writes it only through copies this struct enqueues.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), n) }
    }
}

impl Drop for PinnedWords {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host in new(); no copy into it is pending once the owner
        // (the decoder) is dropped, because Decoder::drop synchronises its stream first.
        let _ = unsafe { cu::free_host(self.ptr.cast()) };
    }
}

fn unsupported(what: &str) -> Error {
    Error::Invalid(format!("fast decode: {what}; use Model::step instead"))
}

impl Decoder {
    /// Builds the decoder for `model` (on CUDA, every matrix in one dtype, no adapters, no dense
    /// layers), with a zero state.
    pub fn new(model: &Model, opts: DecodeOpts) -> Result<Self> {
        let dev = cuda_device(&model.device)?.clone();
        let stream = dev.cuda_stream();
        let cfg = &model.cfg;
        let dtype = model.dtype;
        suffix(dtype)?;
        if opts.threads % 32 != 0 || opts.threads == 0 || opts.threads > 1024 {
            return Err(Error::Invalid(format!(
                "fast decode: threads {} must be a multiple of 32 up to 1024",
                opts.threads
            )));
        }
        if model.embedding.dtype() != dtype {
            return Err(unsupported("the embedding's dtype differs from the model's"));
        }
        let (d, di, n, r, k) = (cfg.hidden_size, cfg.d_inner(), cfg.state_size, cfg.dt_rank(), cfg.conv_dimension);
        if n > 32 || !(1..=32).contains(&k) {
            return Err(unsupported("state size or conv width over 32"));
        }
        let es = dtype.size_in_bytes();
        let f = cfg.ffn_hidden_size;
        if d.max(di).max(f) * es > 48 * 1024 {
            return Err(unsupported("a layer too wide for one block's shared memory"));
        }
        let sms = sm_count(&dev)?;
        let mut hold = Vec::new();
        let mut keep = |t: &Tensor| -> Result<u64> {
            let t = t.contiguous()?;
            let p = dptr(&t)?;
            hold.push(t);
            Ok(p)
        };
        let mut layers = Vec::new();
        let mut table: Vec<i64> = Vec::new();
        let (mut mamba_idx, mut moe_idx) = (Vec::new(), Vec::new());
        for (i, b) in model.layers.iter().enumerate() {
            let norm = keep(&b.norm)?;
            match &b.mixer {
                Mixer::Mamba(m) => {
                    for l in [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj] {
                        if l.lora.is_some() || l.weight.dtype() != dtype {
                            return Err(unsupported("an adapter or a mixed dtype in a Mamba layer"));
                        }
                    }
                    if m.x_proj.bias.is_some() || m.dt_proj.bias.is_some() {
                        return Err(unsupported("a bias on x_proj or dt_proj"));
                    }
                    layers.push(LayerPtrs::Mamba {
                        norm,
                        in_w: keep(&m.in_proj.weight)?,
                        in_b: match &m.in_proj.bias {
                            Some(t) => keep(&t.to_dtype(dtype)?)?,
                            None => 0,
                        },
                        conv_w: keep(&m.conv_w)?,
                        conv_b: keep(&m.conv_b)?,
                        x_w: keep(&m.x_proj.weight)?,
                        dt_w: keep(&m.dt_proj.weight)?,
                        dt_b: keep(&m.dt_bias)?,
                        a_log: keep(&m.a_log)?,
                        d: keep(&m.d)?,
                        out_w: keep(&m.out_proj.weight)?,
                        out_b: match &m.out_proj.bias {
                            Some(t) => keep(&t.to_dtype(dtype)?)?,
                            None => 0,
                        },
                        slot: mamba_idx.len(),
                    });
                    mamba_idx.push(i);
                }
                Mixer::Moe(m) => {
                    if m.router.lora.is_some() {
                        return Err(unsupported("an adapter on a router"));
                    }
                    let ne = m.experts.len();
                    if ne > 32 {
                        return Err(unsupported("more than 32 experts in a layer"));
                    }
                    for e in &m.experts {
                        if e.fc1.lora.is_some() || e.fc2.lora.is_some() || e.fc1.bias.is_some() || e.fc2.bias.is_some() {
                            return Err(unsupported("an adapter or a bias on an expert"));
                        }
                        if e.fc1.weight.dtype() != dtype || e.fc2.weight.dtype() != dtype {
                            return Err(unsupported("an expert in another dtype"));
                        }
                    }
                    // table: per MoE layer, fc1 pointers of its experts then fc2 pointers
                    for e in &m.experts {
                        table.push(keep(&e.fc1.weight)? as i64);
                    }
                    for e in &m.experts {
                        table.push(keep(&e.fc2.weight)? as i64);
                    }
                    let bias = m.router.bias.as_ref().ok_or_else(|| unsupported("a router without bias"))?;
                    layers.push(LayerPtrs::Moe {
                        norm,
                        router_w: keep(&m.router.weight.to_dtype(DType::F32)?)?,
                        router_b: keep(&bias.to_dtype(DType::F32)?)?,
                        n_experts: ne,
                        slot: moe_idx.len(),
                    });
                    moe_idx.push((i, ne));
                }
                Mixer::Dense(_) => return Err(unsupported("a dense MLP layer")),
            }
        }
        let emb = keep(&model.embedding)?;
        let final_w = keep(&model.final_w)?;
        let final_b = keep(&model.final_b)?;
        let mdev = &model.device;
        if table.is_empty() {
            table.push(0);
        }
        let table_len = table.len();
        let table_t = Tensor::from_vec(table, table_len, &Device::Cpu)?.to_device(mdev)?;
        let table_p = dptr(&table_t)?;
        hold.push(table_t);
        let mut alloc = |n: usize, dt: DType| -> Result<u64> {
            let t = Tensor::zeros(n.max(1), dt, mdev)?;
            let p = dptr(&t)?;
            hold.push(t);
            Ok(p)
        };
        let n_mamba = mamba_idx.len();
        let n_moe = moe_idx.len();
        let telem_words = 3 * n_mamba + moe_idx.iter().map(|&(_, e)| e + 1).sum::<usize>();
        let n_words = 1 + telem_words;
        let ssm_blocks = di.div_ceil((SSM_THREADS / 32) as usize) as u32;
        let head_blocks = (cfg.vocab_size.div_ceil((opts.threads / 32) as usize) as u32)
            .min(sms * opts.blocks_per_sm)
            .max(1);
        let bufs = Bufs {
            tok: alloc(1, DType::U32)?,
            step: alloc(1, DType::U32)?,
            out: [alloc(n_words, DType::U32)?, alloc(n_words, DType::U32)?],
            res: alloc(d, DType::F32)?,
            xz: alloc(2 * di, dtype)?,
            dbc: alloc(r + 2 * n, dtype)?,
            v: alloc(di, dtype)?,
            y: alloc(di, dtype)?,
            h: alloc(f, dtype)?,
            route: alloc(2 * n_moe, DType::U32)?,
            logits: alloc(cfg.vocab_size, DType::F32)?,
            pv: alloc(head_blocks as usize, DType::F32)?,
            pi: alloc(head_blocks as usize, DType::U32)?,
            parts: alloc(n_mamba * ssm_blocks as usize * 3, DType::F32)?,
            conv: alloc(n_mamba * di * k, DType::F32)?,
            ssm: alloc(n_mamba * di * n, DType::F32)?,
            table: table_p,
            emb,
            final_w,
            final_b,
        };
        let sizes = Sizes {
            d,
            di,
            n,
            r,
            k,
            f,
            vocab: cfg.vocab_size,
            es,
            gated: cfg.swiglu,
            act: match cfg.expert_activation {
                Activation::Gelu => 0,
                Activation::Silu => 1,
            },
            eps: cfg.layernorm_epsilon as f32,
            sms,
            head_blocks,
            ssm_blocks,
        };
        let mut me = Self {
            dev,
            dtype,
            stream,
            opts,
            sizes,
            layers,
            _hold: hold,
            bufs,
            launches: [Vec::new(), Vec::new()],
            graphs: [None, None],
            host: PinnedWords::new(2 * n_words)?,
            n_words,
            mamba_idx,
            moe_idx,
            steps: 0,
        };
        me.launches = [me.build(0)?, me.build(1)?];
        Ok(me)
    }

    /// Kernel launches per decoded token.
    pub fn launches_per_token(&self) -> usize {
        self.launches[0].len()
    }

    /// The options this decoder was built with.
    pub fn opts(&self) -> DecodeOpts {
        self.opts
    }

    fn build(&self, slot: usize) -> Result<Vec<Launch>> {
        let s = self.sizes;
        let b = &self.bufs;
        let dev = &self.dev;
        let o = self.opts;
        let sfx = suffix(self.dtype)?;
        let th = o.threads;
        let warps = th / 32;
        let cap = (s.sms * o.blocks_per_sm).max(1);
        let rows_grid = |m: usize| (m.div_ceil(warps as usize) as u32).clamp(1, cap);
        let vec_ok = |kdim: usize| i32::from((kdim * s.es) % 16 == 0);
        let split = if o.split_k > 0 { o.split_k } else { 2 };
        let pf = i32::from(o.prefetch);
        let out = b.out[slot];
        let pre = if o.preload { "pre_" } else { "" };
        let f_embed = func(dev, Module::Decode, &format!("embed_{sfx}"))?;
        let f_fc1 = func(dev, Module::Decode, &format!("moe_fc1_{sfx}"))?;
        let f_resid = func(dev, Module::Decode, &format!("gemv_resid_{pre}{sfx}"))?;
        let f_head = func(dev, Module::Decode, &format!("head_{pre}{sfx}"))?;
        let f_final = func(dev, Module::Decode, "sample_final")?;
        let f_inconv = func(dev, Module::Decode, &format!("in_proj_conv_{pre}{sfx}"))?;
        let f_rows = func(dev, Module::Decode, &format!("gemv_rows_{pre}{sfx}"))?;
        let f_ssm = func(dev, Module::MambaStep, &format!("ssm_step_{sfx}"))?;
        let n_mamba = self.mamba_idx.len();
        // words of the out buffer: [token, mamba sums (3 per layer), moe (E + 1 per layer)]
        let mut moe_words = Vec::new();
        let mut w = 1 + 3 * n_mamba;
        for &(_, e) in &self.moe_idx {
            moe_words.push(out + 4 * w as u64);
            w += e + 1;
        }
        let mut v = Vec::new();
        v.push(
            Launch::new(f_embed, (s.d.div_ceil(256) as u32, 1, 1), 256, 0)
                .label("embed")
                .ptr(b.emb)
                .ptr(b.tok)
                .i32(s.d)
                .ptr(b.res),
        );
        let r2 = s.r + 2 * s.n;
        let mut table_off = 0u64;
        for l in &self.layers {
            match l {
                LayerPtrs::Mamba {
                    norm,
                    in_w,
                    in_b,
                    conv_w,
                    conv_b,
                    x_w,
                    dt_w,
                    dt_b,
                    a_log,
                    d,
                    out_w,
                    out_b,
                    slot: ms,
                } => {
                    let conv = b.conv + (ms * s.di * s.k * 4) as u64;
                    let ssm = b.ssm + (ms * s.di * s.n * 4) as u64;
                    // in_proj with the block's RMSNorm, conv window + SiLU as epilogue:
                    // xz = W_in · T(rmsnorm(res)) (2·di), v = SiLU(conv(window)) (di)
                    v.push(
                        Launch::new(f_inconv.clone(), (rows_grid(2 * s.di), 1, 1), th, (s.d * s.es) as u32)
                            .label("mamba.in_proj+norm+conv")
                            .ptr(*in_w)
                            .i32(2 * s.di)
                            .i32(s.d)
                            .ptr(b.res)
                            .ptr(*norm)
                            .f32(s.eps)
                            .ptr(*in_b)
                            .ptr(b.xz)
                            .i32(s.di)
                            .i32(s.k)
                            .ptr(conv)
                            .ptr(*conv_w)
                            .ptr(*conv_b)
                            .ptr(b.v)
                            .int(vec_ok(s.d))
                            .int(pf),
                    );
                    // x_proj: dbc = W_x · v (R + 2N rows), one block per row
                    v.push(
                        Launch::new(f_rows.clone(), (r2 as u32, 1, 1), th, 0)
                            .label("mamba.x_proj")
                            .ptr(*x_w)
                            .i32(r2)
                            .i32(s.di)
                            .ptr(b.v)
                            .ptr(b.dbc)
                            .int(vec_ok(s.di))
                            .int(pf),
                    );
                    // dt_proj + softplus + SSM update + D skip + gate; state in place
                    v.push(
                        Launch::new(f_ssm.clone(), (s.ssm_blocks, 1, 1), SSM_THREADS, 0)
                            .label("mamba.ssm_step")
                            .i32(1)
                            .i32(s.di)
                            .i32(s.r)
                            .i32(s.n)
                            .i32(s.k)
                            .ptr(b.xz)
                            .i32(2 * s.di)
                            .ptr(conv)
                            .ptr(conv)
                            .ptr(*conv_w)
                            .ptr(*conv_b)
                            .ptr(b.dbc)
                            .ptr(*dt_w)
                            .ptr(*dt_b)
                            .ptr(*a_log)
                            .ptr(*d)
                            .ptr(ssm)
                            .ptr(ssm)
                            .ptr(b.y)
                            .ptr(if o.probe {
                                b.parts + (ms * s.ssm_blocks as usize * 12) as u64
                            } else {
                                0
                            })
                            .int(1),
                    );
                    // out_proj into the residual stream
                    v.push(
                        Launch::new(f_resid.clone(), (rows_grid(s.d), split, 1), th, 0)
                            .label("mamba.out_proj+residual")
                            .ptr(*out_w)
                            .ptr(0)
                            .ptr(0)
                            .i32(s.d)
                            .i32(s.di)
                            .ptr(b.y)
                            .ptr(b.res)
                            .ptr(0)
                            .ptr(*out_b)
                            .int(vec_ok(s.di))
                            .int(pf),
                    );
                }
                LayerPtrs::Moe {
                    norm,
                    router_w,
                    router_b,
                    n_experts,
                    slot: es,
                } => {
                    let route = b.route + (8 * es) as u64;
                    let fc1_tab = b.table + table_off;
                    let fc2_tab = fc1_tab + (8 * n_experts) as u64;
                    table_off += (16 * n_experts) as u64;
                    // router (in every block) + the chosen expert's fc1 with the block's RMSNorm
                    // and the (gated) activation
                    v.push(
                        Launch::new(f_fc1.clone(), (rows_grid(s.f), 1, 1), th, (s.d * s.es) as u32)
                            .label("moe.router+fc1+norm+act")
                            .ptr(*router_w)
                            .ptr(*router_b)
                            .i32(*n_experts)
                            .ptr(fc1_tab)
                            .ptr(route)
                            .ptr(if o.probe { moe_words[*es] } else { 0 })
                            .i32(s.f)
                            .i32(s.d)
                            .ptr(b.res)
                            .ptr(*norm)
                            .f32(s.eps)
                            .ptr(b.h)
                            .int(if s.gated { 1 } else { 2 })
                            .int(s.act)
                            .int(vec_ok(s.d)),
                    );
                    // fc2, scaled by the gate, into the residual stream
                    v.push(
                        Launch::new(f_resid.clone(), (rows_grid(s.d), split, 1), th, 0)
                            .label("moe.fc2+gate+residual")
                            .ptr(0)
                            .ptr(fc2_tab)
                            .ptr(route)
                            .i32(s.d)
                            .i32(s.f)
                            .ptr(b.h)
                            .ptr(b.res)
                            .ptr(route + 4)
                            .ptr(0)
                            .int(vec_ok(s.f))
                            .int(pf),
                    );
                }
            }
        }
        v.push(
            Launch::new(f_head, (s.head_blocks, 1, 1), th, (s.d * s.es) as u32)
                .label("head+layernorm+argmax")
                .ptr(b.emb)
                .i32(s.vocab)
                .i32(s.d)
                .ptr(b.res)
                .ptr(b.final_w)
                .ptr(b.final_b)
                .f32(s.eps)
                .ptr(b.logits)
                .ptr(b.pv)
                .ptr(b.pi)
                .f32(o.temperature)
                .u64(o.seed)
                .ptr(b.step)
                .int(vec_ok(s.d))
                .int(pf),
        );
        v.push(
            Launch::new(f_final, (1, 1, 1), 1024, 0)
                .label("sample")
                .ptr(b.pv)
                .ptr(b.pi)
                .int(s.head_blocks as i32)
                .ptr(b.tok)
                .ptr(b.step)
                .ptr(out)
                .ptr(if o.probe { b.parts } else { 0 })
                .i32(n_mamba)
                .int(s.ssm_blocks as i32),
        );
        Ok(v.into_iter().map(|l| l.pdl(o.pdl)).collect())
    }

    /// Enqueues one step writing to out slot `slot` (graph replay if captured), and the copy of
    /// its words to the host. Does not wait.
    pub fn enqueue(&mut self, slot: usize) -> Result<()> {
        if let Some(g) = &self.graphs[slot] {
            g.launch().w()?;
        } else {
            self.enqueue_eager(slot)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn enqueue_eager(&mut self, slot: usize) -> Result<()> {
        for l in &self.launches[slot] {
            l.run(&self.stream)?;
        }
        let n = self.n_words_copied();
        let dst = self.host.slice_mut(slot * self.n_words, n);
        // SAFETY: dst is page-locked host memory owned by self; src is the device out slot of n words.
        unsafe { cu::memcpy_dtoh_async(dst, self.bufs.out[slot], self.stream.cu_stream()) }.w()?;
        Ok(())
    }

    fn n_words_copied(&self) -> usize {
        if self.opts.probe {
            self.n_words
        } else {
            1
        }
    }

    /// Captures the step (both slots) as CUDA graphs; later steps replay them.
    pub fn capture(&mut self) -> Result<()> {
        // one eager step first: kernel modules loaded, nothing lazy left for the capture
        for slot in 0..2 {
            if self.graphs[slot].is_some() {
                continue;
            }
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .w()?;
            let r = self.enqueue_eager(slot);
            let g = self.stream.end_capture(CUgraphInstantiate_flags(0)).w();
            r?;
            let g = g?.ok_or_else(|| Error::Invalid("fast decode: the graph capture recorded nothing".into()))?;
            g.upload().w()?;
            self.graphs[slot] = Some(g);
        }
        Ok(())
    }

    /// Whether the step runs as a captured graph.
    pub fn is_captured(&self) -> bool {
        self.graphs[0].is_some()
    }

    /// Runs one step and waits: returns the sampled token (also the next step's input).
    pub fn step(&mut self) -> Result<u32> {
        self.enqueue(0)?;
        self.stream.synchronize().w()?;
        Ok(self.token(0))
    }

    /// The token of the last completed step that wrote slot `slot` (after a synchronisation).
    pub fn token(&self, slot: usize) -> u32 {
        self.host.slice(slot * self.n_words, 1).first().copied().unwrap_or(0)
    }

    /// Records an event on the decode stream (for pipelined stepping).
    pub fn record(&self) -> Result<CudaEvent> {
        Ok(self.stream.record_event(None).w()?)
    }

    /// Sets the next step's input token.
    pub fn set_token(&mut self, id: u32) -> Result<()> {
        if id as usize >= self.sizes.vocab {
            return Err(Error::TokenOutOfVocab {
                id,
                vocab: self.sizes.vocab,
            });
        }
        let f = func(&self.dev, Module::Decode, "set_token")?;
        Launch::new(f, (1, 1, 1), 32, 0).ptr(self.bufs.tok).u32(id).run(&self.stream)?;
        self.steps = 0;
        Ok(())
    }

    /// Copies a batch-1 model state into the decoder's state buffers.
    pub fn load_state(&mut self, st: &State) -> Result<()> {
        if st.batch != 1 {
            return Err(unsupported("a state of batch other than 1"));
        }
        let s = self.sizes;
        for (slot, l) in st.layers.iter().flatten().enumerate() {
            let conv = l.conv.to_dtype(DType::F32)?.contiguous()?;
            let ssm = l.ssm.to_dtype(DType::F32)?.contiguous()?;
            if conv.elem_count() != s.di * s.k || ssm.elem_count() != s.di * s.n || slot >= self.mamba_idx.len() {
                return Err(Error::Invalid("fast decode: the state does not match the model".into()));
            }
            let dst_c = self.bufs.conv + (slot * s.di * s.k * 4) as u64;
            let dst_s = self.bufs.ssm + (slot * s.di * s.n * 4) as u64;
            // SAFETY: both ranges lie inside the decoder's state buffers and the tensors.
            unsafe {
                cu::memcpy_dtod_async(dst_c, dptr(&conv)?, s.di * s.k * 4, self.stream.cu_stream()).w()?;
                cu::memcpy_dtod_async(dst_s, dptr(&ssm)?, s.di * s.n * 4, self.stream.cu_stream()).w()?;
            }
            self.stream.synchronize().w()?;
        }
        Ok(())
    }

    /// The decoder's state as a model [`State`] (copies), at position `pos`.
    pub fn state(&self, model: &Model, pos: usize) -> Result<State> {
        let s = self.sizes;
        let mut st = model.new_state(1)?;
        for (slot, l) in st.layers.iter_mut().flatten().enumerate() {
            let conv = Tensor::zeros((1, s.di, s.k), DType::F32, &model.device)?;
            let ssm = Tensor::zeros((1, s.di, s.n), DType::F32, &model.device)?;
            // SAFETY: as in load_state, the other way round.
            unsafe {
                cu::memcpy_dtod_async(
                    dptr(&conv)?,
                    self.bufs.conv + (slot * s.di * s.k * 4) as u64,
                    s.di * s.k * 4,
                    self.stream.cu_stream(),
                )
                .w()?;
                cu::memcpy_dtod_async(
                    dptr(&ssm)?,
                    self.bufs.ssm + (slot * s.di * s.n * 4) as u64,
                    s.di * s.n * 4,
                    self.stream.cu_stream(),
                )
                .w()?;
            }
            *l = LayerState { conv, ssm };
        }
        self.stream.synchronize().w()?;
        st.pos = pos;
        Ok(st)
    }

    /// The logits of the last step (f32, vocab), copied to the host.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.sizes.vocab];
        self.stream.synchronize().w()?;
        // SAFETY: v has vocab f32; the logits buffer too.
        unsafe { cu::memcpy_dtoh_async(&mut v, self.bufs.logits, self.stream.cu_stream()) }.w()?;
        self.stream.synchronize().w()?;
        Ok(v)
    }

    /// Appends the telemetry of the last step that wrote `slot` to `probe` (probe option on).
    pub fn record_probe(&self, slot: usize, probe: &mut Probe) -> Result<()> {
        if !self.opts.probe {
            return Err(Error::Invalid("fast decode: built without the probe".into()));
        }
        let words = self.host.slice(slot * self.n_words, self.n_words);
        let f = |i: usize| f32::from_bits(words.get(i).copied().unwrap_or(0));
        if probe.mamba.is_empty() && probe.moe.is_empty() {
            for &i in &self.mamba_idx {
                probe.mamba.push(MambaRecord {
                    layer: i,
                    ..Default::default()
                });
            }
            for &(i, e) in &self.moe_idx {
                probe.moe.push(MoeRecord {
                    layer: i,
                    n_experts: e,
                    ..Default::default()
                });
            }
        }
        probe.n_tokens += 1;
        for (j, rec) in probe.mamba.iter_mut().enumerate() {
            let o = 1 + 3 * j;
            rec.ssm_norm.push(f(o).max(0.0).sqrt());
            rec.conv_norm.push(f(o + 1).max(0.0).sqrt());
            rec.mean_delta.push(f(o + 2) / self.sizes.di as f32);
        }
        let mut o = 1 + 3 * self.mamba_idx.len();
        for (rec, &(_, e)) in probe.moe.iter_mut().zip(&self.moe_idx) {
            for x in 0..e {
                rec.logits.push(f(o + x));
            }
            rec.experts.push(f(o + e) as u32);
            o += e + 1;
        }
        Ok(())
    }

    /// Per-kernel GPU time of the step: `n` eager steps (no PDL, no graph) with a timing event
    /// around every launch. Returns (label, µs per token, launches per token), slowest first.
    pub fn profile(&mut self, n: usize) -> Result<Vec<(&'static str, f64, usize)>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let launches: Vec<Launch> = self.launches[0].iter().cloned().map(|l| l.pdl(false)).collect();
        let ctx = self.stream.context().clone();
        let mut acc = vec![0f64; launches.len()];
        for _ in 0..n.max(1) {
            let evs = (0..=launches.len())
                .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .w()?;
            evs[0].record(&self.stream).w()?;
            for (i, l) in launches.iter().enumerate() {
                l.run(&self.stream)?;
                evs[i + 1].record(&self.stream).w()?;
            }
            self.stream.synchronize().w()?;
            for i in 0..launches.len() {
                acc[i] += f64::from(evs[i].elapsed_ms(&evs[i + 1]).w()?) * 1e3;
            }
        }
        let mut rows: Vec<(&'static str, f64, usize)> = Vec::new();
        for (l, t) in launches.iter().zip(&acc) {
            let per = t / n.max(1) as f64;
            match rows.iter_mut().find(|r| r.0 == l.label) {
                Some(r) => {
                    r.1 += per;
                    r.2 += 1;
                }
                None => rows.push((l.label, per, 1)),
            }
        }
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(rows)
    }

    /// Bytes the step must read from device memory at least (weights it touches once, the state
    /// read and written): the numerator of achieved bandwidth.
    pub fn bytes_per_token(model: &Model) -> usize {
        let cfg = &model.cfg;
        let es = model.dtype.size_in_bytes();
        let (d, di, n, k, r) = (cfg.hidden_size, cfg.d_inner(), cfg.state_size, cfg.conv_dimension, cfg.dt_rank());
        let mut bytes = cfg.vocab_size * d * es + d * es + 2 * d * 4; // head (+ embedding row), final norm
        for l in &model.layers {
            bytes += d * 4; // norm
            match &l.mixer {
                Mixer::Mamba(_) => {
                    bytes += (2 * di * d + (r + 2 * n) * di + di * r + d * di) * es; // matrices
                    bytes += (di * k + di + di + di * n + di) * 4; // conv w/b, dt bias, A_log, D
                    bytes += 2 * (di * k + di * n) * 4; // state read + written
                }
                Mixer::Moe(m) => {
                    let e = m.experts.len();
                    bytes += e * d * 4 + e * 4; // router
                    bytes += (cfg.fc1_rows() * d + d * cfg.ffn_hidden_size) * es;
                    // one expert
                }
                Mixer::Dense(_) => bytes += (cfg.fc1_rows() * d + d * cfg.ffn_hidden_size) * es,
            }
        }
        bytes
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // pending copies into the pinned buffer must finish before it is freed
        let _ = self.stream.synchronize();
    }
}
