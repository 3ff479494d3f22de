//! The decode step's launch list (one per output slot) and its per-kernel profile.

use candle_core::cuda_backend::WrapErr;

use super::quant::QuantArgs;
use super::{Decoder, LayerPtrs, SSM_THREADS};
use crate::error::Result;
use crate::ops::cuda::{func, suffix, Launch, Module};

impl Decoder {
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
        let mut v = Vec::new();
        v.push(
            Launch::new(wf("embed", &b.emb)?, (s.d.div_ceil(256) as u32, 1, 1), 256, 0)
                .label("embed")
                .ptr(b.emb.p)
                .ptr(b.tok)
                .i32(s.d)
                .ptr(b.res)
                .quant_args(&b.emb, 0),
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
                    ..
                } => {
                    let conv = b.conv + (ms * s.di * s.k * 4) as u64;
                    let ssm = b.ssm + (ms * s.di * s.n * 4) as u64;
                    // in_proj with the block's RMSNorm, conv window + SiLU as epilogue:
                    // xz = W_in · T(rmsnorm(res)) (2·di), v = SiLU(conv(window)) (di)
                    v.push(
                        Launch::new(wf("in_proj_conv", in_w)?, (rows_grid(2 * s.di), 1, 1), th, xs)
                            .label("mamba.in_proj+norm+conv")
                            .ptr(in_w.p)
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
                            .int(in_w.vec(s.d, s.es))
                            .quant_args(in_w, 0),
                    );
                    // x_proj: dbc = W_x · v (R + 2N rows), one block per row
                    v.push(
                        Launch::new(wf("gemv_rows", x_w)?, (r2 as u32, 1, 1), th, 0)
                            .label("mamba.x_proj")
                            .ptr(x_w.p)
                            .i32(r2)
                            .i32(s.di)
                            .ptr(b.v)
                            .ptr(b.dbc)
                            .int(x_w.vec(s.di, s.es))
                            .quant_args(x_w, 0),
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
                        Launch::new(wf("gemv_resid", out_w)?, (rows_grid(s.d), split, 1), th, 0)
                            .label("mamba.out_proj+residual")
                            .ptr(out_w.p)
                            .ptr(0)
                            .ptr(0)
                            .i32(s.d)
                            .i32(s.di)
                            .ptr(b.y)
                            .ptr(b.res)
                            .ptr(0)
                            .ptr(*out_b)
                            .int(out_w.vec(s.di, s.es))
                            .quant_args(out_w, 0),
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
                            .ptr(*router_w)
                            .ptr(*router_b)
                            .i32(*n_experts)
                            .ptr(fc1_tab)
                            .ptr(route)
                            .ptr(telem)
                            .i32(s.f)
                            .i32(s.d)
                            .ptr(b.res)
                            .ptr(*norm)
                            .f32(s.eps)
                            .ptr(b.h)
                            .int(epi)
                            .int(s.act)
                            .int(fc1.vec(s.d, s.es))
                            .quant_args(fc1, fc1_stab),
                    );
                    // fc2, scaled by the gate, into the residual stream
                    v.push(
                        Launch::new(wf("gemv_resid", fc2)?, (rows_grid(s.d), split, 1), th, 0)
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
                            .int(fc2.vec(s.f, s.es))
                            .quant_args(fc2, fc2_stab),
                    );
                }
            }
        }
        v.push(
            Launch::new(wf("head", &b.emb)?, (s.head_blocks, 1, 1), th, xs)
                .label("head+layernorm+argmax")
                .ptr(b.emb.p)
                .i32(s.vocab)
                .i32(s.d)
                .ptr(b.res)
                .ptr(b.final_w)
                .ptr(b.final_b)
                .f32(s.eps)
                .ptr(b.logits)
                .ptr(b.pv)
                .ptr(b.pi)
                .int(b.emb.vec(s.d, s.es))
                .quant_args(&b.emb, 0),
        );
        let parts = if o.probe { b.parts } else { 0 };
        v.push(match &self.sampler {
            Some(smp) => smp.launch(b.logits, s.vocab, b.tok, b.step, out, parts, n_mamba, s.ssm_blocks as usize)?,
            None => Launch::new(f_final, (1, 1, 1), 1024, 0)
                .label("argmax")
                .ptr(b.pv)
                .ptr(b.pi)
                .i32(s.head_blocks as usize)
                .ptr(b.tok)
                .ptr(b.step)
                .ptr(out)
                .ptr(parts)
                .i32(n_mamba)
                .i32(s.ssm_blocks as usize),
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
