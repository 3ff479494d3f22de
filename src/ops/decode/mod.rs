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
use crate::model::{Mixer, Model};
use crate::ops::cuda::{cuda_device, dptr, func, max_smem_optin, sm_count, suffix, Launch, Module};

mod io;
mod launches;
mod persistent;

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
    /// Staged layout (variants `*_pre_*`): each warp copies its first weight row (or K slice)
    /// into shared memory (cp.async) before waiting for the previous kernel, so weights stream in
    /// while that kernel runs; a MoE layer runs its router as a one-block kernel that publishes
    /// the expert early, and the fc1 blocks stage that expert's rows as soon as it is known.
    pub preload: bool,
    /// One persistent kernel per token (`kernels/persistent.cu`): every stage of the step in one
    /// cooperative launch, grid-wide barriers between dependent stages.
    pub persistent: bool,
    /// Threads per block of the persistent kernel (a multiple of 32 up to 512).
    pub persistent_threads: u32,
    /// Blocks per multiprocessor of the persistent kernel (capped by what fits at once).
    pub persistent_blocks_per_sm: u32,
    /// Persistent kernel: MB of static weights asked of L2 ahead of the running stage (each block
    /// its own rows; at least the next stage while waiting at a barrier); 0 asks for none.
    pub lookahead_mb: u32,
    /// Persistent kernel, fused layout: x_proj folded into in_proj, out_proj into the SSM step,
    /// fc2 into router + fc1 (split over K by block, partial sums added with atomics; transposed
    /// copies of out_proj and every fc2 are made): three grid barriers per Mamba + MoE pair
    /// instead of six. Needs Mamba and MoE layers alternating, starting with Mamba. The rows each
    /// block adds go through shared memory when they fit (W_out's copied before the barrier that
    /// opens the SSM stage, fc2's right after the router).
    pub fuse: bool,
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
            persistent: false,
            persistent_threads: 512,
            persistent_blocks_per_sm: 1,
            lookahead_mb: 0,
            fuse: false,
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
        /// out_proj transposed, (di, d) (fused persistent layout; else 0)
        out_wt: u64,
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
    /// The most dynamic shared memory a block may use on this device (bytes).
    max_smem: u32,
    /// The persistent kernel's launch shape (persistent option on).
    pgrid: Option<persistent::Grid>,
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
    /// The persistent kernel's barrier counter (u64).
    bar: u64,
    /// Fused persistent layout: fc2 transposed per expert (same layout as `table`), x_proj sums
    /// (f32, R + 2N), the second residual copy (f32, d); else 0.
    table_t: u64,
    dbcf: u64,
    res_alt: u64,
    /// Per-stage start times of the persistent kernel (profiles; u64, stages + 1).
    timing: u64,
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
        let max_smem = max_smem_optin(&dev)?;
        let fused = opts.persistent && opts.fuse;
        if fused {
            let alternating = model.layers.iter().enumerate().all(|(i, b)| match b.mixer {
                Mixer::Mamba(_) => i % 2 == 0,
                Mixer::Moe(_) => i % 2 == 1,
                Mixer::Dense(_) => false,
            });
            if !alternating {
                return Err(unsupported(
                    "the fused persistent layout needs Mamba and MoE layers alternating, starting with Mamba \
                     (turn fuse off)",
                ));
            }
        }
        let mut hold = Vec::new();
        let mut keep = |t: &Tensor| -> Result<u64> {
            let t = t.contiguous()?;
            let p = dptr(&t)?;
            hold.push(t);
            Ok(p)
        };
        let mut layers = Vec::new();
        let mut table: Vec<i64> = Vec::new();
        let mut table_t: Vec<i64> = Vec::new();
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
                        out_wt: if fused { keep(&m.out_proj.weight.t()?)? } else { 0 },
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
                    if fused {
                        table_t.extend(std::iter::repeat_n(0, ne));
                        for e in &m.experts {
                            table_t.push(keep(&e.fc2.weight.t()?)? as i64);
                        }
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
        let table_dev = Tensor::from_vec(table, table_len, &Device::Cpu)?.to_device(mdev)?;
        let table_p = dptr(&table_dev)?;
        hold.push(table_dev);
        let table_t_p = if fused {
            let n = table_t.len().max(1);
            table_t.resize(n, 0);
            let t = Tensor::from_vec(table_t, n, &Device::Cpu)?.to_device(mdev)?;
            let p = dptr(&t)?;
            hold.push(t);
            p
        } else {
            0
        };
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
        let pgrid = if opts.persistent {
            Some(persistent::Grid::new(&dev, dtype, &opts, cfg, n_mamba, n_moe, sms, max_smem)?)
        } else {
            None
        };
        let ssm_threads = pgrid.as_ref().map_or(SSM_THREADS, |g| g.threads);
        let ssm_blocks = di.div_ceil((ssm_threads / 32) as usize) as u32;
        let head_blocks = match &pgrid {
            Some(g) => g.blocks,
            None => (cfg.vocab_size.div_ceil((opts.threads / 32) as usize) as u32)
                .min(sms * opts.blocks_per_sm)
                .max(1),
        };
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
            // per MoE layer: expert, gate (f32 bits), the step flag of the staged layout, unused
            route: alloc(4 * n_moe, DType::U32)?,
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
            bar: alloc(2, DType::U32)?,
            table_t: table_t_p,
            dbcf: if fused { alloc(r + 2 * n, DType::F32)? } else { 0 },
            res_alt: if fused { alloc(d, DType::F32)? } else { 0 },
            timing: match &pgrid {
                Some(g) => alloc(2 * (g.n_stages + 1), DType::U32)?,
                None => 0,
            },
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
            max_smem,
            pgrid,
        };
        me.launches = if opts.persistent {
            let (l0, t0) = me.build_persistent(0)?;
            let (l1, t1) = me.build_persistent(1)?;
            me._hold.extend([t0, t1]);
            [l0, l1]
        } else {
            [me.build(0)?, me.build(1)?]
        };
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

    /// Captures the step (both slots) as CUDA graphs; later steps replay them. A cooperative
    /// launch that the driver will not capture is captured as a plain launch of the same grid
    /// (which the GPU holds at once: the grid is sized by occupancy).
    pub fn capture(&mut self) -> Result<()> {
        for slot in 0..2 {
            if self.graphs[slot].is_some() {
                continue;
            }
            let g = match self.capture_slot(slot) {
                Err(_) if self.launches[slot].iter().any(|l| l.coop) => {
                    for l in self.launches.iter_mut().flatten() {
                        l.coop = false;
                    }
                    self.capture_slot(slot)?
                }
                r => r?,
            };
            self.graphs[slot] = Some(g);
        }
        Ok(())
    }

    fn capture_slot(&mut self, slot: usize) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let r = self.enqueue_eager(slot);
        let g = self.stream.end_capture(CUgraphInstantiate_flags(0)).w();
        r?;
        let g = g?.ok_or_else(|| Error::Invalid("fast decode: the graph capture recorded nothing".into()))?;
        g.upload().w()?;
        Ok(g)
    }

    /// Whether the step is one persistent kernel, and whether that kernel goes out as a
    /// cooperative launch (false after a graph capture that had to drop the attribute).
    pub fn persistent(&self) -> Option<bool> {
        self.pgrid.as_ref().map(|_| self.launches[0].iter().any(|l| l.coop))
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
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // pending copies into the pinned buffer must finish before it is freed
        let _ = self.stream.synchronize();
    }
}
