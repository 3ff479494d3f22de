//! A Mamba half-block's gradients without autograd, for fine-tuning on the GPU (the layer-wise
//! recomputation of `finetune::recompute` calls it once per Mamba layer, last to first).
//!
//! For h_out = h + out_proj(mixer(RMSNorm(h))) and the gradient g of h_out, the block is run
//! forward again as far as the backward needs (norm, in_proj, conv + SiLU, x_proj, dt_proj; the
//! scan itself only inside its backward kernel) and then differentiated by hand:
//!
//! ```text
//! go   = g·W_out                              (n, di)    dW_out = gᵀ·out   (out from the scan's backward)
//! scan tail backward (kernels/mamba_train.cu): dv, ddt, dz, dB, dC, dA_log, dD, d(dt bias)
//! dδ   = ddt·W_dt                              (n, R)     dW_dt  = ddtᵀ·δ
//! dv  += [dδ; dB; dC]·W_x                      (n, di)    dW_x   = [dδ; dB; dC]ᵀ·v
//! conv + SiLU backward: du (into dxz's first half; dz is in its second), dconv_w, dconv_b
//! dxn  = dxz·W_in                              (n, d)     dW_in  = dxzᵀ·xn
//! RMSNorm backward: dh = g + dx, dnorm_w
//! ```
//!
//! with n = B·L tokens. The kernels read and write the projections' bf16 buffers in place (u and
//! z as halves of in_proj's output, dz and du straight into the one dxz buffer), where the
//! autograd form (`MambaMixer::forward` with the ops of `ops::mamba_grad`, its twin) cast, packed,
//! narrowed and padded each of them in f32 and ran the scan forward once more. The same
//! roundings: each tensor the autograd form kept in bf16 (the projections' inputs, outputs and
//! their gradients) is bf16 here; the rest is f32. `tests/mamba_block_grad_gpu.rs` compares the
//! two.
//!
//! It applies to bf16 models whose Mamba projections have neither adapters nor biases (full and
//! router-only fine-tuning, and LoRA that leaves the Mamba layers alone); anything else, or a
//! model whose [`crate::model::kernels::Kernels`] turn `mamba_grad` off (`--slow-mamba-grad`),
//! takes autograd.
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::{Mixer, Model};
use crate::ops::cuda::{cuda_device, dptr, empty};
use crate::ops::mamba_kernels::{conv_backward, conv_forward, tail_backward, ConvDims, TailPtrs, KMAX, NMAX};
use crate::ops::params::ScanIn;
use crate::ops::rms_norm::{rms_norm, rms_norm_backward};

/// What [`half_block_grads`] returns: the gradient of the block's input and, for each of the
/// block's trained tensors, the tensor as the model holds it (a variable, or the bf16 cast of
/// one) and its gradient in the tensor's dtype; `Tensor::backward_seeded` on the pair carries
/// the gradient through the cast to the variable.
pub struct BlockGrads {
    /// (B, L, d) f32
    pub dh: Tensor,
    pub params: Vec<(Tensor, Tensor)>,
}

fn trained(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

/// A plain bf16 projection: no adapter, no bias.
fn plain(l: &Linear) -> bool {
    l.lora.is_none() && l.bias.is_none() && l.weight.dtype() == DType::BF16
}

/// The gradients of half-block `i` (a Mamba layer) at input `h` (B, L, d) f32 for the output
/// gradient `g` (B, L, d) f32, every sequence starting from the zero state; `None` when the
/// block is not one this path takes (see the module doc), to be differentiated by autograd.
pub fn half_block_grads(model: &Model, i: usize, h: &Tensor, g: &Tensor) -> Result<Option<BlockGrads>> {
    let blk = model.layer(i)?;
    let Mixer::Mamba(m) = &blk.mixer else { return Ok(None) };
    let k = model.kernels;
    let fits = model.trains_with_kernels()
        && k.mamba_grad
        && k.rms_norm
        && h.dtype() == DType::F32
        && [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj].into_iter().all(plain)
        && (1..=KMAX).contains(&m.d_conv)
        && (1..=NMAX).contains(&m.d_state);
    if !fits {
        return Ok(None);
    }
    let (bn, len, d) = h.dims3()?;
    let (n, di, r, ns, k) = (bn * len, m.d_inner, m.dt_rank, m.d_state, m.d_conv);
    let dev = h.device();
    let cd = cuda_device(dev)?;
    let bf = DType::BF16;
    let eps = model.cfg.layernorm_epsilon;
    let (w_in, w_x, w_dt, w_out) = (
        m.in_proj.weight.detach(),  // (2·di, d)
        m.x_proj.weight.detach(),   // (R + 2N, di)
        m.dt_proj.weight.detach(),  // (di, R)
        m.out_proj.weight.detach(), // (d, di)
    );
    let (conv_w, conv_b) = (m.conv_w.detach().contiguous()?, m.conv_b.detach().contiguous()?); // (di, 1, K), (di)
    let (hd, wn) = (h.detach().reshape((n, d))?.contiguous()?, blk.norm.detach()); // (n, d) f32, (d)

    // forward, as far as the backward needs it
    let xn = rms_norm(&hd, &wn, eps, bf)?; // (n, d) bf16
    let xz = xn.matmul(&w_in.t()?)?; // (n, 2·di) bf16: [u; z]
    let cdims = ConvDims { bn, len, di, k };
    let (v, v16) = (empty(&[n, di], DType::F32, dev)?, empty(&[n, di], bf, dev)?);
    let (pxz, pw, pb) = (dptr(&xz)?, dptr(&conv_w)?, dptr(&conv_b)?);
    // SAFETY: xz (n, 2·di) bf16 (u in each row's first di values), conv_w (di, 1, K) and
    // conv_b (di) f32, v (n, di) f32 and v16 (n, di) bf16 are contiguous tensors bound in this
    // function until it returns (dptr checks contiguity).
    unsafe { conv_forward(cd, "bf16", cdims, pxz, 2 * di, 0, pw, pb, dptr(&v)?, dptr(&v16)?, 0) }?;
    let xdbl = v16.matmul(&w_x.t()?)?; // (n, R + 2N) bf16: [δ; B; C]
    let delta_low = xdbl.narrow(1, 0, r)?.contiguous()?; // (n, R)
    let dt = delta_low.matmul(&w_dt.t()?)?; // (n, di) bf16, before the bias
    let bc = xdbl.narrow(1, r, 2 * ns)?.to_dtype(DType::F32)?.contiguous()?; // (n, 2N) f32
    let p = Tensor::cat(&[&m.a_log.detach().flatten_all()?, &m.d.detach(), &m.dt_bias.detach()], 0)?.contiguous()?; // (di·N + 2·di)

    // backward
    let gb = g.to_dtype(bf)?.reshape((n, d))?; // (n, d) bf16, as out_proj's backward sees it
    let go = gb.matmul(&w_out)?; // (n, di) dL/dout
    let dv = empty(&[n, di], DType::F32, dev)?;
    let (ddt, dxz, yg) = (empty(&[n, di], bf, dev)?, empty(&[n, 2 * di], bf, dev)?, empty(&[n, di], bf, dev)?);
    let dbc = empty(&[n, 2 * ns], DType::F32, dev)?; // every element written
    let dp = Tensor::zeros(p.dims(), DType::F32, dev)?;
    let half = (di * 2) as u64; // bytes of di bf16 values: z and dz start there in their rows
    let io = TailPtrs {
        v: (dptr(&v)?, di),
        dt: (dptr(&dt)?, di),
        z: (pxz + half, 2 * di),
        go: dptr(&go)?,
        dv: (dptr(&dv)?, di),
        ddt: (dptr(&ddt)?, di),
        dz: (dptr(&dxz)? + half, 2 * di),
        yg: dptr(&yg)?,
    };
    let dims = ScanIn::new(bn, len, di, ns, 0, 0)?; // LC and Q are set by tail_backward
                                                    // SAFETY: io's pointers address v and dv (n, di) f32, dt, ddt, go and yg (n, di) bf16, and
                                                    // the z halves of xz / dxz (n, 2·di) bf16 (rows of stride 2·di); bc (n, 2N) and p
                                                    // (di·N + 2·di) are contiguous f32; all are bound in this function until it returns.
    unsafe { tail_backward(dev, cd, "bf16", dims, &io, dptr(&bc)?, dptr(&p)?, 0, &dbc, &dp) }?;
    let d_delta = ddt.matmul(&w_dt)?; // (n, R)
    let dxdbl = Tensor::cat(&[&d_delta, &dbc.to_dtype(bf)?], 1)?; // (n, R + 2N) bf16
    let dv2 = dxdbl.matmul(&w_x)?; // (n, di) bf16: x_proj's share of dv
                                   // SAFETY: xz and dxz (n, 2·di) bf16 (u / du in each row's first di values), dv (n, di) f32
                                   // and dv2 (n, di) bf16 are contiguous tensors bound in this function until it returns.
    let (dconv_w, dconv_b) = unsafe {
        conv_backward(
            dev,
            cd,
            "bf16",
            cdims,
            (pxz, 2 * di, 0),
            &conv_w,
            &conv_b,
            (dptr(&dv)?, dptr(&dv2)?),
            (dptr(&dxz)?, 2 * di),
        )
    }?;
    let dxn = dxz.matmul(&w_in)?; // (n, d) bf16
    let (dx, dnorm) = rms_norm_backward(&hd, &wn, eps, bf, &dxn, trained(&blk.norm))?;
    let dh = (g + dx.reshape((bn, len, d))?)?;

    let mut params = Vec::new();
    let mut put = |t: &Tensor, grad: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        if trained(t) {
            params.push((t.clone(), grad()?));
        }
        Ok(())
    };
    put(&m.out_proj.weight, &|| Ok(gb.t()?.matmul(&yg)?))?; // (d, di)
    put(&m.dt_proj.weight, &|| Ok(ddt.t()?.matmul(&delta_low)?))?; // (di, R)
    put(&m.x_proj.weight, &|| Ok(dxdbl.t()?.matmul(&v16)?))?; // (R + 2N, di)
    put(&m.in_proj.weight, &|| Ok(dxz.t()?.matmul(&xn)?))?; // (2·di, d)
    put(&m.conv_w, &|| Ok(dconv_w.clone()))?;
    put(&m.conv_b, &|| Ok(dconv_b.clone()))?;
    put(&m.a_log, &|| Ok(dp.narrow(0, 0, di * ns)?.reshape((di, ns))?))?;
    put(&m.d, &|| Ok(dp.narrow(0, di * ns, di)?))?;
    put(&m.dt_bias, &|| Ok(dp.narrow(0, di * ns + di, di)?))?;
    if let Some(dw) = dnorm {
        put(&blk.norm, &|| Ok(dw.clone()))?;
    }
    Ok(Some(BlockGrads { dh, params }))
}
