//! Row selection with a scatter backward, for the fine-tuning step's two row lookups on the GPU
//! (kernels/rows.cu): the positions whose logits the loss needs (`Model::head_rows`) and the
//! embedding rows of the input ids (its gradient, in `finetune::recompute`).
//!
//! candle's `index_select` differentiates into `index_add`, which its CUDA backend runs one
//! thread per column looping over every row: on the H200 at 8,192 rows of 1,472 values each of
//! the two took 4.3 ms a step (Nsight Compute, 2.8B shapes, batch 4). Here the backward is one
//! float atomic add per value. Twin: `index_select` (the CPU path, and `BLACKMAMBA_NO_KERNELS`).
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{blocks_for, cuda_device, dptr, f32_ptr, func, suffix, to_candle, Launch, Module};
use crate::ops::params::{to_i32, to_i64, GatherRowsParams, ScatterAddRowsParams};

const THREADS: u32 = 256;
const MAX_BLOCKS: u32 = 16 * 132;

/// dst (rows, d) f32 with dst[idx[i]] = Σ of the src rows i that name it: src (n, d) f32 or bf16,
/// idx (n) u32 < rows.
pub fn scatter_add_rows(src: &Tensor, idx: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, d) = src.dims2()?;
    if idx.dims() != [n] || idx.dtype() != DType::U32 {
        return Err(Error::Invalid(format!(
            "scatter rows: {n} source rows but indices {:?} {:?}",
            idx.dims(),
            idx.dtype()
        )));
    }
    let dev = src.device();
    let cd = cuda_device(dev)?;
    let (src, idx) = (src.contiguous()?, idx.contiguous()?);
    let dst = Tensor::zeros((rows, d), DType::F32, dev)?;
    let params = ScatterAddRowsParams {
        idx: dptr(&idx)?,
        src: dptr(&src)?,
        dst: dptr(&dst)?,
        n: to_i64(n, "scatter rows: source rows")?,
        d: to_i32(d, "scatter rows: row width")?,
    };
    // SAFETY: idx (n) u32, src (n, d) and dst (rows, d) f32 are the contiguous tensors above,
    // held until this function returns (candle's stream orders their release after the launch);
    // the caller's indices are < rows (the kernel does not check them).
    unsafe {
        Launch::new(
            func(cd, Module::Rows, &format!("scatter_add_rows_{}", suffix(src.dtype())?))?,
            (blocks_for(n * d, THREADS, MAX_BLOCKS), 1, 1),
            THREADS,
            0,
        )
        .params(params)
        .label("scatter-rows")
        .run(&cd.cuda_stream())
    }?;
    Ok(dst)
}

/// x (R, d) f32 -> x[idx] (n, d), differentiable in x (its gradient is [`scatter_add_rows`]).
pub fn select_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    if x.dtype() != DType::F32 || idx.rank() != 1 || idx.dtype() != DType::U32 {
        return Err(Error::Invalid(format!(
            "select rows: needs (R, d) f32 and (n) u32, got {:?} {:?} and {:?} {:?}",
            x.dims(),
            x.dtype(),
            idx.dims(),
            idx.dtype()
        )));
    }
    let op = SelectRows {
        idx: idx.contiguous()?,
        rows,
        d,
    };
    Ok(x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?)
}

struct SelectRows {
    idx: Tensor,
    rows: usize,
    d: usize,
}

impl CustomOp1 for SelectRows {
    fn name(&self) -> &'static str {
        "select-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the select-rows op runs on CUDA only; the CPU takes index_select")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (n, d) = (self.idx.dim(0)?, self.d);
        let out = dev.alloc_zeros::<f32>(n * d)?;
        let stream = dev.cuda_stream();
        let op = out.device_ptr(&stream).0;
        let params = GatherRowsParams {
            idx: dptr(&self.idx).map_err(to_candle)?,
            x: f32_ptr(s, l, "row selection")?,
            out: op,
            n: to_i64(n, "select rows: indices").map_err(to_candle)?,
            d: to_i32(d, "select rows: row width").map_err(to_candle)?,
        };
        // SAFETY: idx (n) u32 is held by the op, x the op's contiguous (R, d) f32 input, out the
        // (n, d) f32 buffer just allocated (returned); the indices are < R (the caller's promise
        // in select_rows; the kernel does not check them).
        unsafe {
            Launch::new(
                func(&dev, Module::Rows, "gather_rows_f32").map_err(to_candle)?,
                (blocks_for(n * d, THREADS, MAX_BLOCKS), 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("gather-rows")
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        scatter_add_rows(&grad.to_dtype(DType::F32)?, &self.idx, self.rows)
            .map(Some)
            .map_err(to_candle)
    }
}
