//! The experts of a MoE layer in the prefill as two batched cuBLAS products (fc1, then fc2), every
//! expert in one launch each, instead of a product pair per expert.
//!
//! A per-expert product has few rows (2,048 tokens over 8 experts: ~256), so fc2's output
//! (256 × d) is a couple of dozen output tiles and leaves most SMs idle, and the experts run one
//! after another. Here the tokens of each expert are laid out in an expert-major padded block
//! (E, R, d), R = the largest group, and `cublasGemmBatchedEx` takes one (R × k)·(k × n) problem
//! per expert (pointer arrays, so the experts' weights stay where they are). The padding rows are
//! computed and thrown away; when they would more than double the work (very uneven routing) the
//! per-expert loop runs instead. Twin: the per-expert loop of [`super::moe::moe_forward`] (and so
//! [`crate::model::moe::SwitchMlp::forward`]); `tests/gpu_parity.rs` compares them.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::cublas::sys;
use candle_core::{DType, Tensor};

use super::{launch_cap, THREADS};
use crate::error::{Error, Result};
use crate::model::moe::{Mlp, SwitchMlp};
use crate::ops::cuda::{blocks_for, cuda_device, dptr, empty, func, Launch, Module};
use crate::ops::gated_act::gated_act_inference;
use crate::ops::params::{to_i32, MoePadIndexParams};

/// Whether an expert can run on this path: gated, no bias, no adapter, contiguous weights.
fn plain(e: &Mlp, dtype: DType) -> bool {
    let ok =
        |l: &crate::model::linear::Linear| l.lora.is_none() && l.bias.is_none() && l.weight.dtype() == dtype && l.weight.is_contiguous();
    e.gated && ok(&e.fc1) && ok(&e.fc2)
}

/// The experts' outputs in the padded layout, (E·R, d) in the weights' dtype, and each token's
/// row in it (T) u32, for `moe_unpermute`; None when this layer takes the per-expert loop.
///
/// * `xs`: (T, d) the layer's input in the weights' dtype, token order
/// * `expert`, `inverse`: (T) u32 from `router_top1` / `moe_group`; `counts`: tokens per expert
pub(super) fn experts_batched(
    m: &SwitchMlp,
    xs: &Tensor,
    expert: &Tensor,
    inverse: &Tensor,
    counts: &[u32],
) -> Result<Option<(Tensor, Tensor)>> {
    let dt = xs.dtype();
    let n_exp = m.experts.len();
    let (n_tok, d) = xs.dims2()?;
    let rows = counts.iter().copied().max().unwrap_or(0) as usize;
    if rows == 0 || n_exp * rows > 2 * n_tok || !m.experts.iter().all(|e| plain(e, dt)) {
        return Ok(None);
    }
    let dev = xs.device();
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    // base[e]: expert e's first position in the grouped order
    let mut base = Vec::with_capacity(n_exp);
    let mut acc = 0u32;
    for &c in counts {
        base.push(acc);
        acc += c;
    }
    let base = Tensor::new(base.as_slice(), dev)?;
    let padpos = empty(&[n_tok], DType::U32, dev)?;
    let order_pad = Tensor::zeros(n_exp * rows, DType::U32, dev)?;
    let params = MoePadIndexParams {
        expert: dptr(expert)?,
        inverse: dptr(inverse)?,
        base: dptr(&base)?,
        padpos: dptr(&padpos)?,
        order_pad: dptr(&order_pad)?, // padding rows gather token 0
        Tn: to_i32(n_tok, "batched experts: tokens")?,
        E: to_i32(n_exp, "batched experts: experts")?,
        stride: to_i32(rows, "batched experts: rows per expert")?,
    };
    // SAFETY: expert and inverse (T) are the caller's contiguous u32 tensors, base (E),
    // padpos (T) and order_pad (E·rows) the u32 tensors above (all read as int), bound until
    // this function returns.
    unsafe {
        Launch::new(
            func(cd, Module::Prefill, "moe_pad_index")?,
            (blocks_for(n_tok, THREADS, launch_cap(dev)?), 1, 1),
            THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    let x_pad = xs.index_select(&order_pad, 0)?.contiguous()?; // (E·R, d)
    let f2 = m.experts[0].fc1.weight.dim(0)?; // 2f: gate and up rows
    let f = f2 / 2;
    let w1: Vec<&Tensor> = m.experts.iter().map(|e| &e.fc1.weight).collect();
    let a = batched_linear(&w1, &x_pad, rows, f2, d)?; // (E·R, 2f)
    let h = gated_act_inference(&a, m.experts[0].act)?; // (E·R, f)
    let w2: Vec<&Tensor> = m.experts.iter().map(|e| &e.fc2.weight).collect();
    let ys = batched_linear(&w2, &h, rows, d, f)?; // (E·R, d)
    Ok(Some((ys, padpos)))
}

/// For every expert e: rows [e·R, (e+1)·R) of the output = the same rows of `x` · wₑᵀ, in one
/// `cublasGemmBatchedEx` call. ws\[e\]: (n, k) row-major (a Linear's weight); x: (E·R, k)
/// contiguous; returns (E·R, n) in x's dtype (f32 accumulation).
fn batched_linear(ws: &[&Tensor], x: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
    let dt = x.dtype();
    let dev = x.device();
    let cd = cuda_device(dev)?;
    let e = ws.len();
    for w in ws {
        if w.dims2()? != (n, k) {
            return Err(Error::Invalid(format!(
                "batched experts: weight {:?}, expected ({n}, {k})",
                w.dims()
            )));
        }
    }
    let out = empty(&[e * rows, n], dt, dev)?;
    let sz = dt.size_in_bytes() as u64;
    let (px, po) = (dptr(x)?, dptr(&out)?);
    // pointer arrays on the device: [w_0 … w_E−1, x_0 …, out_0 …]
    let mut ptrs = Vec::with_capacity(3 * e);
    for w in ws {
        ptrs.push(dptr(w)? as i64);
    }
    ptrs.extend((0..e).map(|i| (px + i as u64 * (rows * k) as u64 * sz) as i64));
    ptrs.extend((0..e).map(|i| (po + i as u64 * (rows * n) as u64 * sz) as i64));
    let ptrs = Tensor::new(ptrs.as_slice(), dev)?;
    let pp = dptr(&ptrs)?;
    let ty = match dt {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        other => return Err(Error::Invalid(format!("batched experts: no cuBLAS type for {other:?}"))),
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let blas = cd.cublas_handle();
    let to_int = |v: usize| i32::try_from(v).map_err(|_| Error::Invalid(format!("batched experts: size {v} over i32")));
    // column-major view: out_eᵀ (n × R) = op_T(w_e as k × n) · x_eᵀ (k × R)
    // SAFETY: every pointer is a live device allocation of the sizes given (the pointer array
    // and the tensors outlive the call on the stream: their frees are ordered after it).
    let status = unsafe {
        sys::cublasGemmBatchedEx(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            to_int(n)?,
            to_int(rows)?,
            to_int(k)?,
            (&alpha as *const f32).cast(),
            pp as *const *const std::ffi::c_void,
            ty,
            to_int(k)?,
            (pp + 8 * e as u64) as *const *const std::ffi::c_void,
            ty,
            to_int(k)?,
            (&beta as *const f32).cast(),
            (pp + 16 * e as u64) as *const *mut std::ffi::c_void,
            ty,
            to_int(n)?,
            to_int(e)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(Error::Invalid(format!("batched experts: cublasGemmBatchedEx failed: {status:?}")));
    }
    Ok(out)
}
