//! The persistent decode step (`kernels/persistent.cu`): the stages of [`Decoder::build`]'s
//! launch list as one table that a single kernel per token walks, with grid-wide barriers between
//! dependent stages. The kernel goes out as one cooperative launch (all blocks co-resident),
//! replayed from a CUDA graph like the multi-kernel step.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};

use super::{DecodeOpts, Decoder, LayerPtrs};
use crate::error::{Error, Result};
use crate::model::config::{Config, LayerKind};
use crate::ops::cuda::{dptr, func, suffix, Launch, Module};

/// u32 words per stage (`Stage` in kernels/persistent.cu: 192 bytes).
const STAGE_WORDS: usize = 48;

/// Stage ops (`StageOp` in kernels/persistent.cu).
#[derive(Debug, Clone, Copy)]
enum Op {
    Embed = 0,
    InProj = 1,
    XProj = 2,
    Ssm = 3,
    Resid = 4,
    Fc1 = 5,
    Head = 6,
    Final = 7,
    InProjX = 8,
    SsmOut = 9,
    Fc12 = 10,
}

/// One stage of the table, and the bytes of static weights its L2 request covers (host only).
#[derive(Debug, Clone)]
struct Stage {
    op: Op,
    p: Vec<u64>,
    i: Vec<i32>,
    f: [f32; 2],
    bytes: usize,
}

impl Stage {
    fn new(op: Op, p: &[u64], i: &[usize], f: [f32; 2], bytes: usize) -> Self {
        Self {
            op,
            p: p.to_vec(),
            i: i.iter().map(|&x| i32::try_from(x).unwrap_or(i32::MAX)).collect(),
            f,
            bytes,
        }
    }

    fn words(&self, pf_end: usize) -> [u32; STAGE_WORDS] {
        let mut w = [0u32; STAGE_WORDS];
        for (k, &p) in self.p.iter().take(16).enumerate() {
            w[2 * k] = p as u32;
            w[2 * k + 1] = (p >> 32) as u32;
        }
        for (k, &x) in self.i.iter().take(10).enumerate() {
            w[32 + k] = x as u32;
        }
        w[42] = self.f[0].to_bits();
        w[43] = self.f[1].to_bits();
        w[44] = self.op as u32;
        w[45] = u32::try_from(pf_end).unwrap_or(u32::MAX);
        w
    }
}

/// The persistent kernel's launch shape.
#[derive(Debug, Clone)]
pub(super) struct Grid {
    func: CudaFunction,
    pub threads: u32,
    pub blocks: u32,
    /// Dynamic shared memory: the normalised input, the stage table from `table_off`, the fused
    /// stages' scratch from `scratch_off` (lists of `lmax` rows, partial sums).
    smem: u32,
    table_off: u32,
    scratch_off: u32,
    lmax: u32,
    /// Where the fused stages stage their transposed rows (0: not staged).
    stage_off: u32,
    pub n_stages: usize,
    /// Stage labels (profiles).
    pub labels: Vec<&'static str>,
}

impl Grid {
    /// Sizes the grid: `persistent_blocks_per_sm` blocks per multiprocessor, capped by how many
    /// the GPU holds at once with this kernel's registers and shared memory.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &CudaDevice,
        dtype: DType,
        opts: &DecodeOpts,
        cfg: &Config,
        n_mamba: usize,
        n_moe: usize,
        sms: u32,
        max_smem: u32,
    ) -> Result<Self> {
        let threads = opts.persistent_threads;
        if threads % 32 != 0 || threads == 0 || threads > 512 {
            return Err(Error::Invalid(format!(
                "persistent decode: threads {threads} must be a multiple of 32 up to 512"
            )));
        }
        let (d, di, f) = (cfg.hidden_size, cfg.d_inner(), cfg.ffn_hidden_size);
        let es = dtype.size_in_bytes();
        let labels = stage_labels(cfg, opts.fuse);
        let n_stages = labels.len();
        debug_assert_eq!(
            n_stages,
            1 + 4 * n_mamba + 2 * n_moe + 2 - opts.fuse as usize * (2 * n_mamba + n_moe)
        );
        let table_off = (d * es).div_ceil(16) * 16;
        let scratch_off = table_off + n_stages * STAGE_WORDS * 4;
        // list slots per block: the most rows (channels, fc1 rows, SSM warps) one block takes, at
        // the smallest grid (one block per multiprocessor)
        let nw = (threads / 32) as usize;
        let g = sms as usize * nw;
        let lmax = if opts.fuse {
            nw * di.div_ceil(g).max(f.div_ceil(g)).max(di.div_ceil(nw).div_ceil(sms as usize))
        } else {
            0
        };
        let red = if opts.fuse { threads as usize * (16 / es) * 4 } else { 0 };
        let mut bytes = scratch_off + lmax * 8 + red;
        // the fused stages' rows of W_out / fc2 through shared memory, when they fit
        let stage_off = bytes.div_ceil(16) * 16;
        let stage_bytes = lmax * d * es;
        let stage_off = if opts.fuse && (d * es) % 16 == 0 && stage_off + stage_bytes <= max_smem as usize {
            bytes = stage_off + stage_bytes;
            stage_off
        } else {
            0
        };
        let smem = u32::try_from(bytes).unwrap_or(u32::MAX);
        if smem > max_smem {
            return Err(Error::Invalid(format!(
                "persistent decode: {n_stages} stages need {} KiB of shared memory, the GPU allows {} KiB; \
                 use the multi-kernel decoder (bench without --persistent)",
                smem / 1024,
                max_smem / 1024
            )));
        }
        let f = func(dev, Module::Persistent, &format!("persistent_{}", suffix(dtype)?))?;
        if smem > 48 * 1024 {
            let v = i32::try_from(smem).unwrap_or(i32::MAX);
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v)
                .map_err(|e| Error::Invalid(format!("persistent decode: cannot allow {smem} bytes of shared memory: {e}")))?;
        }
        let fit = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, bytes, None)
            .map_err(|e| Error::Invalid(format!("persistent decode: occupancy query failed: {e}")))?;
        if fit == 0 {
            return Err(Error::Invalid(format!(
                "persistent decode: a block of {threads} threads does not fit on a multiprocessor; use fewer threads"
            )));
        }
        let blocks = sms * opts.persistent_blocks_per_sm.clamp(1, fit);
        let u = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Ok(Self {
            func: f,
            threads,
            blocks,
            smem,
            table_off: u(table_off),
            scratch_off: u(scratch_off),
            lmax: u(lmax),
            stage_off: u(stage_off),
            n_stages,
            labels,
        })
    }
}

/// The stages of one step, by label: embed; per layer its stages; head; final.
fn stage_labels(cfg: &Config, fuse: bool) -> Vec<&'static str> {
    let mut v = vec!["embed"];
    for i in 0..cfg.num_layers {
        match (cfg.layer_kind(i), fuse) {
            (LayerKind::Mamba, false) => v.extend([
                "mamba.in_proj+norm+conv",
                "mamba.x_proj",
                "mamba.ssm_step",
                "mamba.out_proj+residual",
            ]),
            (LayerKind::Mamba, true) => v.extend(["mamba.in_proj+conv+x_proj", "mamba.ssm_step+out_proj"]),
            (_, false) => v.extend(["moe.router+fc1+act", "moe.fc2+gate+residual"]),
            (_, true) => v.push("moe.router+fc1+fc2"),
        }
    }
    v.extend(["head+layernorm+argmax", "sample"]);
    v
}

impl Decoder {
    /// The persistent step writing its output words to out slot `slot`: one launch, and the
    /// device stage table it reads (to be kept alive with the decoder).
    pub(super) fn build_persistent(&self, slot: usize) -> Result<(Vec<Launch>, Tensor)> {
        let g = self
            .pgrid
            .as_ref()
            .ok_or_else(|| Error::Invalid("persistent decode: no grid".into()))?;
        let s = self.sizes;
        let b = &self.bufs;
        let o = self.opts;
        let es = s.es;
        let warps = (g.threads / 32) as usize;
        let vec_ok = |kdim: usize| usize::from((kdim * es) % 16 == 0);
        let split = (if o.split_k > 0 { o.split_k } else { 2 }).clamp(1, g.blocks) as usize;
        let out = b.out[slot];
        let n_mamba = self.mamba_idx.len();
        let mut moe_words = Vec::new();
        let mut w = 1 + 3 * n_mamba;
        for &(_, e) in &self.moe_idx {
            moe_words.push(out + 4 * w as u64);
            w += e + 1;
        }
        let r2 = s.r + 2 * s.n;
        let nvb = s.ssm_blocks as usize;
        let fuse = o.fuse;
        let mut st = vec![Stage::new(Op::Embed, &[b.emb, b.tok, b.res, b.dbcf], &[s.d, r2], [0.0; 2], 0)];
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
                    out_wt,
                    slot: ms,
                } => {
                    let conv = b.conv + (ms * s.di * s.k * 4) as u64;
                    let ssm = b.ssm + (ms * s.di * s.n * 4) as u64;
                    let telem = if o.probe { b.parts + (ms * nvb * 12) as u64 } else { 0 };
                    if fuse {
                        st.push(Stage::new(
                            Op::InProjX,
                            &[
                                *in_w, b.res, *norm, *in_b, b.xz, conv, *conv_w, *conv_b, b.v, *x_w, b.dbcf, b.res_alt,
                            ],
                            &[2 * s.di, s.d, s.di, s.k, vec_ok(s.d), r2],
                            [s.eps, 0.0],
                            2 * s.di * s.d * es,
                        ));
                        st.push(Stage::new(
                            Op::SsmOut,
                            &[
                                b.xz, conv, *conv_w, *conv_b, b.dbcf, *dt_w, *dt_b, *a_log, *d, ssm, b.y, telem, *out_wt, b.res, b.res_alt,
                                *out_b,
                            ],
                            &[s.di, s.r, s.n, s.k, nvb, s.d, vec_ok(s.d)],
                            [0.0; 2],
                            s.di * s.r * es + 2 * s.di * s.n * 4,
                        ));
                        continue;
                    }
                    st.push(Stage::new(
                        Op::InProj,
                        &[*in_w, b.res, *norm, *in_b, b.xz, conv, *conv_w, *conv_b, b.v],
                        &[2 * s.di, s.d, s.di, s.k, vec_ok(s.d)],
                        [s.eps, 0.0],
                        2 * s.di * s.d * es,
                    ));
                    st.push(Stage::new(
                        Op::XProj,
                        &[*x_w, b.v, b.dbc],
                        &[r2, s.di, vec_ok(s.di)],
                        [0.0; 2],
                        r2 * s.di * es,
                    ));
                    st.push(Stage::new(
                        Op::Ssm,
                        &[b.xz, conv, *conv_w, *conv_b, b.dbc, *dt_w, *dt_b, *a_log, *d, ssm, b.y, telem],
                        &[s.di, s.r, s.n, s.k, nvb],
                        [0.0; 2],
                        s.di * s.r * es + 2 * s.di * s.n * 4,
                    ));
                    st.push(Stage::new(
                        Op::Resid,
                        &[*out_w, 0, 0, b.y, b.res, 0, *out_b],
                        &[s.d, s.di, vec_ok(s.di), split],
                        [0.0; 2],
                        s.d * s.di * es,
                    ));
                }
                LayerPtrs::Moe {
                    norm,
                    router_w,
                    router_b,
                    n_experts,
                    slot: ms,
                } => {
                    let route = b.route + (16 * ms) as u64;
                    let fc1_tab = b.table + table_off;
                    let fc2_tab = fc1_tab + (8 * n_experts) as u64;
                    table_off += (16 * n_experts) as u64;
                    let telem = if o.probe { moe_words[*ms] } else { 0 };
                    let epi = if s.gated { 1 } else { 2 };
                    if fuse {
                        let fc2t_tab = b.table_t + (table_off - (8 * n_experts) as u64);
                        st.push(Stage::new(
                            Op::Fc12,
                            &[
                                *router_w, *router_b, fc1_tab, route, telem, b.res_alt, *norm, fc2t_tab, b.res, b.dbcf,
                            ],
                            &[*n_experts, s.f, s.d, epi, s.act as usize, vec_ok(s.d), r2],
                            [s.eps, 0.0],
                            n_experts * s.d * 4,
                        ));
                        continue;
                    }
                    st.push(Stage::new(
                        Op::Fc1,
                        &[*router_w, *router_b, fc1_tab, route, telem, b.res, *norm, b.h, fc2_tab],
                        &[*n_experts, s.f, s.d, epi, s.act as usize, vec_ok(s.d), s.d, s.f, split],
                        [s.eps, 0.0],
                        n_experts * s.d * 4,
                    ));
                    st.push(Stage::new(
                        Op::Resid,
                        &[0, fc2_tab, route, b.h, b.res, route + 4, 0],
                        &[s.d, s.f, vec_ok(s.f), split],
                        [0.0; 2],
                        0,
                    ));
                }
            }
        }
        let head_first = (g.blocks as usize * warps).min(s.vocab) * s.d * es;
        st.push(Stage::new(
            Op::Head,
            &[b.emb, b.res, b.final_w, b.final_b, b.logits, b.pv, b.pi, b.step, o.seed],
            &[s.vocab, s.d, vec_ok(s.d)],
            [s.eps, o.temperature],
            head_first,
        ));
        st.push(Stage::new(
            Op::Final,
            &[b.pv, b.pi, b.tok, b.step, out, if o.probe { b.parts } else { 0 }],
            &[g.blocks as usize, n_mamba, nvb],
            [0.0; 2],
            0,
        ));
        if st.len() != g.n_stages {
            return Err(Error::Invalid("persistent decode: stage count mismatch".into()));
        }
        // the L2 window when stage t starts: stages t.. while their bytes fit the budget
        let budget = o.lookahead_mb as usize * 1_000_000;
        let mut words = Vec::with_capacity(st.len() * STAGE_WORDS);
        for t in 0..st.len() {
            let (mut end, mut sum) = (t + 1, st[t].bytes);
            while end < st.len() && sum + st[end].bytes <= budget {
                sum += st[end].bytes;
                end += 1;
            }
            words.extend_from_slice(&st[t].words(end));
        }
        let n_words = words.len();
        let table = Tensor::from_vec(words, n_words, &Device::Cpu)?.to_device(&Device::Cuda(self.dev.clone()))?;
        let int = |x: u32| i32::try_from(x).unwrap_or(i32::MAX);
        let launch = Launch::new(g.func.clone(), (g.blocks, 1, 1), g.threads, g.smem)
            .label("persistent step")
            .coop(true)
            .ptr(dptr(&table)?)
            .i32(st.len())
            .ptr(b.bar)
            .int(int(g.table_off))
            .int(i32::from(o.lookahead_mb > 0))
            .int(int(g.scratch_off))
            .int(int(g.lmax))
            .int(int(g.stage_off))
            .ptr(0);
        Ok((vec![launch], table))
    }

    /// Per-stage GPU time of the persistent step: `n` steps with block 0 writing the time each
    /// stage starts (a stage's time includes the grid barrier after it). Returns (label, µs per
    /// token, stages per token), slowest first.
    pub(super) fn profile_persistent(&mut self, n: usize) -> Result<Vec<(&'static str, f64, usize)>> {
        use candle_core::cuda_backend::cudarc::driver::result as cu;
        use candle_core::cuda_backend::WrapErr;
        let g = self
            .pgrid
            .as_ref()
            .ok_or_else(|| Error::Invalid("persistent decode: no grid".into()))?;
        let labels = g.labels.clone();
        let mut l = self.launches[0]
            .first()
            .cloned()
            .ok_or_else(|| Error::Invalid("persistent decode: no launch".into()))?;
        if let Some(last) = l.args.last_mut() {
            *last = crate::ops::cuda::Arg::Ptr(self.bufs.timing);
        }
        let mut acc = vec![0f64; labels.len()];
        let mut t = vec![0u64; labels.len() + 1];
        for _ in 0..n.max(1) {
            l.run(&self.stream)?;
            // SAFETY: t has stages + 1 u64, as the timing buffer.
            unsafe { cu::memcpy_dtoh_async(&mut t, self.bufs.timing, self.stream.cu_stream()) }.w()?;
            self.stream.synchronize().w()?;
            for (k, a) in acc.iter_mut().enumerate() {
                *a += t[k + 1].saturating_sub(t[k]) as f64 / 1e3;
            }
        }
        let mut rows: Vec<(&'static str, f64, usize)> = Vec::new();
        for (label, us) in labels.iter().zip(&acc) {
            let per = us / n.max(1) as f64;
            match rows.iter_mut().find(|r| r.0 == *label) {
                Some(r) => {
                    r.1 += per;
                    r.2 += 1;
                }
                None => rows.push((label, per, 1)),
            }
        }
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(rows)
    }
}
