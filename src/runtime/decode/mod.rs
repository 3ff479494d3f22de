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
//!
//! A quantised model (`--quant`) runs the same kernel bodies over its packed weights
//! (`kernels/qgemv.cu`, see [`quant`]); its twin is this decoder over the dense copies
//! ([`DecodeOpts::packed`] off), compared in `tests/quant_gpu.rs`.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{result as cu, CudaEvent, CudaGraph, CudaStream};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::{Mixer, Model};
use crate::ops::cuda::{compute_capability, cuda_device, dptr, func, sm_count, suffix, Launch, Module};
use crate::ops::params::SetTokenParams;

mod io;
mod launches;
mod quant;

use quant::{common_format, linear_ref, weight_ref, WRef};

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
    /// End each step with the device sampler (`ops::sample`: the host sampler's settings, set by
    /// [`Decoder::set_sampling`]); off, the step is greedy (the head's argmax).
    pub sampler: bool,
    /// Programmatic dependent launch: each kernel starts while the previous one finishes
    /// (sm_90 and newer; [`Decoder::new`] turns it off on older GPUs).
    pub pdl: bool,
    /// Read quantised linears (`--quant`) packed, through the quantised kernels; off, every
    /// matrix is read as its dense copy (the dequantise-then-matmul twin).
    pub packed: bool,
}

impl Default for DecodeOpts {
    fn default() -> Self {
        Self {
            threads: 256,
            blocks_per_sm: 8,
            split_k: 0,
            probe: false,
            sampler: false,
            pdl: true,
            packed: true,
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
        in_w: WRef,
        in_b: u64,
        conv_w: u64,
        conv_b: u64,
        x_w: WRef,
        dt_w: u64,
        dt_b: u64,
        a_log: u64,
        d: u64,
        out_w: WRef,
        out_b: u64,
        slot: usize,
    },
    Moe {
        norm: u64,
        router_w: u64,
        router_b: u64,
        n_experts: usize,
        slot: usize,
        /// The experts' fc1 and fc2 as the table launches read them (`p` 0: the tables hold the
        /// pointers; packed: codes in `table`, scales in `stable`).
        fc1: WRef,
        fc2: WRef,
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
    /// The device sampler of `opts.sampler`.
    sampler: Option<crate::ops::sample::DeviceSampler>,
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
    /// Beside `table`: the packed experts' scales pointers (0 for dense layers).
    stable: u64,
    /// The embedding, also the head.
    emb: WRef,
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
    /// Whether the decoder can take `model`: a kernel dtype for every matrix, no adapters, no
    /// biases on x_proj, dt_proj or the experts, at most 32 experts a layer, no dense layers,
    /// widths within one block's shared memory. `Err` says what stands in the way.
    pub fn supports(model: &Model) -> std::result::Result<(), String> {
        let cfg = &model.cfg;
        let dtype = model.dtype;
        if suffix(dtype).is_err() {
            return Err(format!("no decode kernels for {dtype:?}"));
        }
        if model.embedding.dtype() != dtype {
            return Err("the embedding's dtype differs from the model's".into());
        }
        let (d, di, n, k) = (cfg.hidden_size, cfg.d_inner(), cfg.state_size, cfg.conv_dimension);
        if n > 32 || !(1..=32).contains(&k) {
            return Err("state size or conv width over 32".into());
        }
        if d.max(di).max(cfg.ffn_hidden_size) * dtype.size_in_bytes() > 48 * 1024 {
            return Err("a layer too wide for one block's shared memory".into());
        }
        for b in &model.layers {
            match &b.mixer {
                Mixer::Mamba(m) => {
                    if [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj]
                        .iter()
                        .any(|l| l.lora.is_some() || l.weight.dtype() != dtype)
                    {
                        return Err("an adapter or a mixed dtype in a Mamba layer".into());
                    }
                    if m.x_proj.bias.is_some() || m.dt_proj.bias.is_some() {
                        return Err("a bias on x_proj or dt_proj".into());
                    }
                }
                Mixer::Moe(m) => {
                    if m.router.lora.is_some() {
                        return Err("an adapter on a router".into());
                    }
                    if m.router.bias.is_none() {
                        return Err("a router without bias".into());
                    }
                    if m.experts.len() > 32 {
                        return Err("more than 32 experts in a layer".into());
                    }
                    for e in &m.experts {
                        if e.fc1.lora.is_some() || e.fc2.lora.is_some() || e.fc1.bias.is_some() || e.fc2.bias.is_some() {
                            return Err("an adapter or a bias on an expert".into());
                        }
                        if e.fc1.weight.dtype() != dtype || e.fc2.weight.dtype() != dtype {
                            return Err("an expert in another dtype".into());
                        }
                    }
                }
                Mixer::Dense(_) => return Err("a dense MLP layer".into()),
            }
        }
        Ok(())
    }

    /// Builds the decoder for `model` (on CUDA, every matrix in one dtype, no adapters, no dense
    /// layers), with a zero state.
    pub fn new(model: &Model, mut opts: DecodeOpts) -> Result<Self> {
        let dev = cuda_device(&model.device)?.clone();
        // programmatic dependent launch is a Hopper (sm_90) feature
        opts.pdl &= compute_capability(&dev)?.0 >= 9;
        let stream = dev.cuda_stream();
        let cfg = &model.cfg;
        let dtype = model.dtype;
        Self::supports(model).map_err(|why| unsupported(&why))?;
        if opts.threads % 32 != 0 || opts.threads == 0 || opts.threads > 1024 {
            return Err(Error::Invalid(format!(
                "fast decode: threads {} must be a multiple of 32 up to 1024",
                opts.threads
            )));
        }
        let (d, di, n, r, k) = (cfg.hidden_size, cfg.d_inner(), cfg.state_size, cfg.dt_rank(), cfg.conv_dimension);
        let es = dtype.size_in_bytes();
        let f = cfg.ffn_hidden_size;
        let sms = sm_count(&dev)?;
        let mut hold = Vec::new();
        let mut keep = |t: &Tensor| -> Result<u64> {
            let t = t.contiguous()?;
            let p = dptr(&t)?;
            hold.push(t);
            Ok(p)
        };
        let mdev = &model.device;
        let mut layers = Vec::new();
        let mut table: Vec<i64> = Vec::new();
        let mut stable: Vec<i64> = Vec::new();
        let (mut mamba_idx, mut moe_idx) = (Vec::new(), Vec::new());
        for (i, b) in model.layers.iter().enumerate() {
            let norm = keep(&b.norm)?;
            match &b.mixer {
                Mixer::Mamba(m) => {
                    layers.push(LayerPtrs::Mamba {
                        norm,
                        in_w: linear_ref(&m.in_proj, mdev, opts.packed, &mut keep)?,
                        in_b: match &m.in_proj.bias {
                            Some(t) => keep(&t.to_dtype(dtype)?)?,
                            None => 0,
                        },
                        conv_w: keep(&m.conv_w)?,
                        conv_b: keep(&m.conv_b)?,
                        x_w: linear_ref(&m.x_proj, mdev, opts.packed, &mut keep)?,
                        dt_w: keep(&m.dt_proj.weight)?,
                        dt_b: keep(&m.dt_bias)?,
                        a_log: keep(&m.a_log)?,
                        d: keep(&m.d)?,
                        out_w: linear_ref(&m.out_proj, mdev, opts.packed, &mut keep)?,
                        out_b: match &m.out_proj.bias {
                            Some(t) => keep(&t.to_dtype(dtype)?)?,
                            None => 0,
                        },
                        slot: mamba_idx.len(),
                    });
                    mamba_idx.push(i);
                }
                Mixer::Moe(m) => {
                    let ne = m.experts.len();
                    // table: per MoE layer, fc1 pointers of its experts then fc2 pointers (the
                    // codes where packed, their scales at the same places of stable)
                    let mut refs = |fc1: bool| -> Result<WRef> {
                        let ls: Vec<&Linear> = m.experts.iter().map(|e| if fc1 { &e.fc1 } else { &e.fc2 }).collect();
                        // packed only where every expert is, in one format
                        let format = common_format(ls.iter().copied(), opts.packed);
                        for l in &ls {
                            let w = linear_ref(l, mdev, format.is_some(), &mut keep)?;
                            table.push(w.p as i64);
                            stable.push(w.q.map_or(0, |q| q.scales as i64));
                        }
                        Ok(WRef {
                            p: 0,
                            q: format.map(|format| quant::QRef { scales: 0, format }),
                        })
                    };
                    let fc1 = refs(true)?;
                    let fc2 = refs(false)?;
                    let bias = m.router.bias.as_ref().ok_or_else(|| unsupported("a router without bias"))?;
                    layers.push(LayerPtrs::Moe {
                        norm,
                        router_w: keep(&m.router.weight.to_dtype(DType::F32)?)?,
                        router_b: keep(&bias.to_dtype(DType::F32)?)?,
                        n_experts: ne,
                        slot: moe_idx.len(),
                        fc1,
                        fc2,
                    });
                    moe_idx.push((i, ne));
                }
                Mixer::Dense(_) => return Err(unsupported("a dense MLP layer")),
            }
        }
        let emb = weight_ref(&model.embedding, model.head_quant.as_deref(), mdev, opts.packed, &mut keep)?;
        let final_w = keep(&model.final_w)?;
        let final_b = keep(&model.final_b)?;
        if table.is_empty() {
            table.push(0);
            stable.push(0);
        }
        let table_len = table.len();
        let table_dev = Tensor::from_vec(table, table_len, &Device::Cpu)?.to_device(mdev)?;
        let table_p = dptr(&table_dev)?;
        hold.push(table_dev);
        let stable_dev = Tensor::from_vec(stable, table_len, &Device::Cpu)?.to_device(mdev)?;
        let stable_p = dptr(&stable_dev)?;
        hold.push(stable_dev);
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
            // per MoE layer: expert, gate (f32 bits), the step flag of the staged layout, unused
            route: alloc(4 * n_moe, DType::U32)?,
            logits: alloc(cfg.vocab_size, DType::F32)?,
            pv: alloc(head_blocks as usize, DType::F32)?,
            pi: alloc(head_blocks as usize, DType::U32)?,
            parts: alloc(n_mamba * ssm_blocks as usize * 3, DType::F32)?,
            conv: alloc(n_mamba * di * k, DType::F32)?,
            ssm: alloc(n_mamba * di * n, DType::F32)?,
            table: table_p,
            stable: stable_p,
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
            act: cfg.expert_activation.code(),
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
            sampler: match opts.sampler {
                true => Some(crate::ops::sample::DeviceSampler::new(&model.device)?),
                false => None,
            },
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
            // SAFETY: `build` wrote each launch's arguments to match its kernel in
            // kernels/decode.cu and mamba_step.cu, over buffers that `self._hold` keeps alive.
            unsafe { l.run(&self.stream) }?;
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
        for slot in 0..2 {
            if self.graphs[slot].is_none() {
                self.graphs[slot] = Some(self.capture_slot(slot)?);
            }
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

    /// Sets the device sampler's settings, generator state and history for the next steps (a
    /// decoder built with `opts.sampler`); see [`crate::ops::sample::DeviceSampler::reset`].
    pub fn set_sampling(&self, p: &crate::sampling::SamplingParams, rng: u64, history: &[u32]) -> Result<()> {
        match &self.sampler {
            Some(s) => s.reset(p, rng, history),
            None => Err(Error::Invalid("fast decode: built without the device sampler".into())),
        }
    }

    /// The device sampler's state (its generator and draws), when the decoder has one.
    pub fn sampler_state(&self) -> Result<Option<crate::ops::sample::SampleState>> {
        self.sampler.as_ref().map(crate::ops::sample::DeviceSampler::state).transpose()
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
        let params = SetTokenParams { tok: self.bufs.tok, id };
        // SAFETY: set_token writes the one u32 word of the token buffer, which this decoder
        // allocated and holds (`self._hold`).
        unsafe { Launch::new(f, (1, 1, 1), 32, 0).params(params).run(&self.stream) }?;
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
