//! The fused CUDA path of the model's forward and step calls: the same math as the tensor-op
//! twins in `model::{mamba, moe, linear, scan}` with the elementwise chains, the conv, the scan,
//! the router and the token grouping done by the kernels of `kernels/*.cu`. The matrix products
//! stay on cuBLAS (through [`Linear::forward`], so adapters still apply to in/out projections).
//!
//! The CUDA backend of [`Model`]: `Model::run_blocks` dispatches each layer here when the model
//! runs on a CUDA device, is not `differentiable` and has its kernels on ([`super::Kernels`]);
//! [`mamba_train`] is the Mamba mixer of fine-tuning with the fused autograd ops. Every function
//! here has its slow twin named in its doc; `tests/gpu_parity.rs` compares them.
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::ops::cuda::{cuda_device, dptr, dptr_opt, empty, func, suffix, Launch, Module};
use crate::ops::params::{to_i32, AddRmsnormParams};

pub mod mamba;
pub mod mamba_train;
pub mod moe;
mod moe_batched;

pub use mamba::{mamba_forward, mamba_step};
pub use moe::moe_forward;

const THREADS: u32 = 256;

fn launch_cap(dev: &candle_core::Device) -> Result<u32> {
    Ok(crate::ops::cuda::sm_count(cuda_device(dev)?)? * 8)
}

/// Fused residual add + RMSNorm. res (.., d) f32, add (.., d) f32 or `out_dtype` (None for the
/// first layer), w (d) f32 -> (res + add, RMSNorm(res + add)·w as `out_dtype`).
/// Twin: `res + add` then [`crate::model::linear::rms_norm`] then `to_dtype`.
pub fn add_rmsnorm(res: &Tensor, add: Option<&Tensor>, w: &Tensor, eps: f64, out_dtype: DType) -> Result<(Tensor, Tensor)> {
    let dev = res.device();
    let cd = cuda_device(dev)?;
    let res = res.contiguous()?;
    let dims = res.dims().to_vec();
    let d = *dims.last().ok_or_else(|| Error::Invalid("add_rmsnorm: scalar input".into()))?;
    let rows = res.elem_count() / d.max(1);
    let sfx = suffix(out_dtype)?;
    let add = match add {
        Some(a) if a.dtype() == DType::F32 || a.dtype() == out_dtype => Some(a.contiguous()?),
        Some(a) => Some(a.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    let name = match &add {
        Some(a) if a.dtype() != DType::F32 => format!("add_rmsnorm_t_{sfx}"),
        _ => format!("add_rmsnorm_{sfx}"),
    };
    let res_out = empty(&dims, DType::F32, dev)?;
    let out = empty(&dims, out_dtype, dev)?;
    let w = w.contiguous()?;
    let params = AddRmsnormParams {
        res: dptr(&res)?,
        add: dptr_opt(add.as_ref())?,
        res_out: dptr(&res_out)?,
        w: dptr(&w)?,
        out: dptr(&out)?,
        d: to_i32(d, "add_rmsnorm: width")?,
        eps: eps as f32,
    };
    // SAFETY: res and res_out (rows, d) f32, add (rows, d) f32 or in out's dtype (the kernel
    // picked by its dtype above) or null, w (d) and out (rows, d) are contiguous tensors bound in
    // this function until it returns.
    unsafe {
        Launch::new(func(cd, Module::Prefill, &name)?, (rows as u32, 1, 1), THREADS, 0)
            .params(params)
            .run(&cd.cuda_stream())
    }?;
    Ok((res_out, out))
}

/// Final LayerNorm + tied head with f32 logits: h (.., d) f32 -> (.., V) f32. The product reads
/// the embedding in the model dtype and accumulates and stores in f32 (cuBLAS GemmEx), where the
/// twin (`Model::head` on the tensor-op path) rounds the logits to the model dtype.
pub fn head(model: &Model, h: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    let dt = model.embedding.dtype();
    let data_type = match dt {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        other => return Err(Error::Invalid(format!("head: no GemmEx for {other:?}"))),
    };
    let dims = h.dims().to_vec();
    let d = *dims.last().ok_or_else(|| Error::Invalid("head: scalar input".into()))?;
    let eps = model.cfg.layernorm_epsilon as f32;
    let x = candle_nn::ops::layer_norm(&h.contiguous()?, &model.final_w, &model.final_b, eps)?
        .to_dtype(dt)?
        .reshape(((), d))?
        .contiguous()?; // (n, d)
    let n = x.dim(0)?;
    let v = model.cfg.vocab_size;
    let emb = model.embedding.contiguous()?; // (V, d)
    let dev = h.device();
    let cd = cuda_device(dev)?;
    let logits = empty(&[n, v], DType::F32, dev)?;
    let blas = cd.cublas_handle();
    let (alpha, beta) = (1f32, 0f32);
    let (pe, px, pl) = (dptr(&emb)?, dptr(&x)?, dptr(&logits)?);
    // column-major: logitsᵀ (V × n) = E (V × d) · xᵀ (d × n); E is stored row-major (d × V col-major)
    // SAFETY: pointers address live tensors of the stated sizes; the handle is bound to the
    // device's stream, on which the tensors were produced.
    unsafe {
        gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            v as i32,
            n as i32,
            d as i32,
            std::ptr::from_ref(&alpha).cast(),
            pe as *const std::ffi::c_void,
            data_type,
            d as i32,
            px as *const std::ffi::c_void,
            data_type,
            d as i32,
            std::ptr::from_ref(&beta).cast(),
            pl as *mut std::ffi::c_void,
            sys::cudaDataType::CUDA_R_32F,
            v as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Invalid(format!("head: cuBLAS GemmEx failed: {e:?}")))?;
    let mut shape = dims;
    let last = shape.len() - 1;
    shape[last] = v;
    Ok(logits.reshape(shape)?)
}

/// Appends a small tensor's values (any shape, flattened) to a host vector.
fn push_host(dst: &mut Vec<f32>, t: &Tensor) -> Result<()> {
    dst.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    Ok(())
}
