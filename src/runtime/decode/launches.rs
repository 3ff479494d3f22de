//! The decode step's launch list (one per output slot) and its per-kernel profile.

use candle_core::cuda_backend::WrapErr;

use super::{Decoder, LayerPtrs, SSM_THREADS};
use crate::error::Result;
use crate::ops::cuda::{func, suffix, Launch, Module};
use crate::ops::params::{
    to_i32, EmbedParams, GemvResidParams, GemvRowsParams, HeadParams, InProjConvParams, MoeFc1Params, SampleFinalParams, SsmStepParams,
};

impl Decoder {
    /// The step's launches writing to out slot `slot`. Their pointers address `self.bufs` and
    /// the weights that `self._hold` keeps alive; running them is `unsafe` at the call sites
    /// (`enqueue_eager`, the graph capture, `profile`), which rely on that.
    pub(super) fn build(&self, slot: usize) -> Result<Vec<Launch>> {
        let s = self.sizes;
        let b = &self.bufs;
        let dev = &self.dev;
        let o = self.opts;
        let sfx = suffix(self.dtype)?;
        let th = o.threads;
        let warps = th / 32;
        let cap = (s.sms * o.blocks_per_sm).max(1);
        let rows_grid = |m: usize| (m.div_ceil(warps as usize) as u32).clamp(1, cap);
        let split = if o.split_k > 0 { o.split_k } else { 2 };
        let out = b.out[slot];
        // dynamic shared memory: the normalised input of the kernels that have one (K elements)
        let xs = u32::try_from((s.d * s.es).div_ceil(16) * 16)
            .map_err(|_| crate::error::Error::Invalid("fast decode: hidden size too large".into()))?;
        // the products' kernels: dense (decode.cu) or the weight's packed format (qgemv.cu)
        let wf = |name: &str, w| self.weight_func(name, w);
        let f_final = func(dev, Module::Decode, "sample_final")?;
        let f_ssm = func(dev, Module::MambaStep, &format!("ssm_step_{sfx}"))?;
        let n_mamba = self.mamba_idx.len();
        // words of the out buffer: [token, mamba sums (3 per layer), moe (E + 1 per layer)]
        let mut moe_words = Vec::new();
        let mut w = 1 + 3 * n_mamba;
        for &(_, e) in &self.moe_idx {
            moe_words.push(out + 4 * w as u64);
            w += e + 1;
        }
        let i = to_i32;
        // the sizes as the kernels' ints, checked once
        let (d, di, f, k) = (
            i(s.d, "decode: hidden size")?,
            i(s.di, "decode: d_inner")?,
            i(s.f, "decode: ffn size")?,
            i(s.k, "decode: conv width")?,
        );
        let (two_di, r, n) = (
            i(2 * s.di, "decode: in_proj rows")?,
            i(s.r, "decode: dt rank")?,
            i(s.n, "decode: state size")?,
        );
        let mut v = Vec::new();
        v.push(
            Launch::new(wf("embed", &b.emb)?, (s.d.div_ceil(256) as u32, 1, 1), 256, 0)
                .label("embed")
                .params(EmbedParams {
                    emb: b.emb.rows(),
                    tok: b.tok,
                    res: b.res,
                    q: b.emb.packed(0),
                    d,
                }),
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
                    d: d_skip,
                    out_w,
                    out_b,
                    slot: ms,
                    ..
                } => {
                    let conv = b.conv + (ms * s.di * s.k * 4) as u64;
                    let ssm = b.ssm + (ms * s.di * s.n * 4) as u64;
                    // in_proj with the block's RMSNorm, conv window + SiLU as epilogue:
                    // xz = W_in · T(rmsnorm(res)) (2·di), v = SiLU(conv(window)) (di)
                    v.push(
                        Launch::new(wf("in_proj_conv", in_w)?, (rows_grid(2 * s.di), 1, 1), th, xs)
                            .label("mamba.in_proj+norm+conv")
                            .params(InProjConvParams {
                                W: in_w.rows(),
                                res: b.res,
                                nw: *norm,
                                bias: *in_b,
                                xz: b.xz,
                                conv,
                                cw: *conv_w,
                                cb: *conv_b,
                                vout: b.v,
                                q: in_w.packed(0),
                                M: two_di,
                                K: d,
                                eps: s.eps,
                                di,
                                KC: k,
                                vec: in_w.vec(s.d, s.es),
                            }),
                    );
                    // x_proj: dbc = W_x · v (R + 2N rows), one block per row
                    v.push(
                        Launch::new(wf("gemv_rows", x_w)?, (r2 as u32, 1, 1), th, 0)
                            .label("mamba.x_proj")
                            .params(GemvRowsParams {
                                W: x_w.rows(),
                                x: b.v,
                                out: b.dbc,
                                q: x_w.packed(0),
                                M: i(r2, "decode: x_proj rows")?,
                                K: di,
                                vec: x_w.vec(s.di, s.es),
                            }),
                    );
                    // dt_proj + softplus + SSM update + D skip + gate; state in place
                    v.push(
                        Launch::new(f_ssm.clone(), (s.ssm_blocks, 1, 1), SSM_THREADS, 0)
                            .label("mamba.ssm_step")
                            .params(SsmStepParams {
                                xz: b.xz,
                                conv_in: conv,
                                conv_out: conv,
                                cw: *conv_w,
                                cb: *conv_b,
                                dbc: b.dbc,
                                Wdt: *dt_w,
                                dt_bias: *dt_b,
                                A_log: *a_log,
                                Dp: *d_skip,
                                h_in: ssm,
                                h_out: ssm,
                                y: b.y,
                                telem: if o.probe {
                                    b.parts + (ms * s.ssm_blocks as usize * 12) as u64
                                } else {
                                    0
                                },
                                Bn: 1,
                                di,
                                R: r,
                                N: n,
                                K: k,
                                xz_stride: two_di,
                                telem_mode: 1,
                            }),
                    );
                    // out_proj into the residual stream
                    v.push(
                        Launch::new(wf("gemv_resid", out_w)?, (rows_grid(s.d), split, 1), th, 0)
                            .label("mamba.out_proj+residual")
                            .params(GemvResidParams {
                                W: out_w.rows(),
                                wtab: 0,
                                route: 0,
                                x: b.y,
                                res: b.res,
                                gate: 0,
                                bias: *out_b,
                                q: out_w.packed(0),
                                M: d,
                                K: di,
                                vec: out_w.vec(s.di, s.es),
                            }),
                    );
                }
                LayerPtrs::Moe {
                    norm,
                    router_w,
                    router_b,
                    n_experts,
                    slot: es,
                    fc1,
                    fc2,
                } => {
                    let route = b.route + (16 * es) as u64;
                    let fc1_tab = b.table + table_off;
                    let fc2_tab = fc1_tab + (8 * n_experts) as u64;
                    // the packed experts' scales pointers, at the same places of their table
                    let (fc1_stab, fc2_stab) = (b.stable + table_off, b.stable + table_off + (8 * n_experts) as u64);
                    table_off += (16 * n_experts) as u64;
                    let telem = if o.probe { moe_words[*es] } else { 0 };
                    let epi = if s.gated { 1 } else { 2 };
                    // router (in every block) + the chosen expert's fc1 with the block's
                    // RMSNorm and the (gated) activation
                    v.push(
                        Launch::new(wf("moe_fc1", fc1)?, (rows_grid(s.f), 1, 1), th, xs)
                            .label("moe.router+fc1+norm+act")
                            .params(MoeFc1Params {
                                Wr: *router_w,
                                br: *router_b,
                                wtab: fc1_tab,
                                route,
                                telem,
                                res: b.res,
                                nw: *norm,
                                out: b.h,
                                q: fc1.packed(fc1_stab),
                                E: i(*n_experts, "decode: experts")?,
                                M: f,
                                K: d,
                                eps: s.eps,
                                epi,
                                act: s.act,
                                vec: fc1.vec(s.d, s.es),
                            }),
                    );
                    // fc2, scaled by the gate, into the residual stream
                    v.push(
                        Launch::new(wf("gemv_resid", fc2)?, (rows_grid(s.d), split, 1), th, 0)
                            .label("moe.fc2+gate+residual")
                            .params(GemvResidParams {
                                W: fc2.rows(),
                                wtab: fc2_tab,
                                route,
                                x: b.h,
                                res: b.res,
                                gate: route + 4,
                                bias: 0,
                                q: fc2.packed(fc2_stab),
                                M: d,
                                K: f,
                                vec: fc2.vec(s.f, s.es),
                            }),
                    );
                }
            }
        }
        v.push(
            Launch::new(wf("head", &b.emb)?, (s.head_blocks, 1, 1), th, xs)
                .label("head+layernorm+argmax")
                .params(HeadParams {
                    E: b.emb.rows(),
                    res: b.res,
                    lw: b.final_w,
                    lb: b.final_b,
                    logits: b.logits,
                    pv: b.pv,
                    pi: b.pi,
                    q: b.emb.packed(0),
                    V: i(s.vocab, "decode: vocabulary")?,
                    K: d,
                    eps: s.eps,
                    vec: b.emb.vec(s.d, s.es),
                }),
        );
        let parts = if o.probe { b.parts } else { 0 };
        v.push(match &self.sampler {
            Some(smp) => smp.launch(b.logits, s.vocab, b.tok, b.step, out, parts, n_mamba, s.ssm_blocks as usize)?,
            None => Launch::new(f_final, (1, 1, 1), 1024, 0).label("argmax").params(SampleFinalParams {
                pv: b.pv,
                pi: b.pi,
                tok: b.tok,
                step: b.step,
                out,
                parts,
                n: i(s.head_blocks as usize, "decode: head blocks")?,
                n_layers: i(n_mamba, "decode: Mamba layers")?,
                nblk: i(s.ssm_blocks as usize, "decode: SSM blocks")?,
            }),
        });
        Ok(v.into_iter().map(|l| l.pdl(o.pdl)).collect())
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
                // SAFETY: the step's own launches (see `Decoder::enqueue_eager`).
                unsafe { l.run(&self.stream) }?;
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
}
