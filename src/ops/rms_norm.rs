//! RMSNorm of the f32 residual as one autograd op for fine-tuning on the GPU
//! (kernels/rms_norm.cu): y = T(x · rsqrt(mean(x²) + eps) · w), differentiable in x and w.
//!
//! Its twin, [`crate::model::linear::rms_norm`] with `differentiable` then `to_dtype(T)`, writes
//! five (.., d) or (.., 1) f32 tensors forward (x², x / rms, · w, the cast) and backward as many
//! again (the cast's, the binary mul's and div's, the broadcast sums). The op reads x once
//! forward and writes y in T (the cast folded in, so the backward gets T's gradient and no cast
//! node exists); backward it reads x and the gradient once, recomputes each row's rstd (one more
//! sum in a pass it makes anyway, instead of keeping a (rows) tensor beside y), writes dx in f32
//! and each block's share of dw, summed by a second small kernel in a fixed order
//! (deterministic: no float atomics).
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, empty, f32_ptr, func, sm_count, suffix, to_candle, Launch, Module};
use crate::ops::params::{to_i32, to_i64, RmsNormBwdParams, RmsNormDwParams, RmsNormFwdParams};

const THREADS: u32 = 256;
/// Backward blocks per SM (each keeps a d-float dw accumulator in shared memory).
const BWD_BLOCKS_PER_SM: u32 = 4;
/// The widest row whose dw accumulator stays in the default 48 KiB of shared memory; wider rows
/// accumulate in the partial-sum scratch itself.
const MAX_SMEM_D: usize = 48 * 1024 / 4 - 64;

/// x (.., d) f32 and w (d) f32 on CUDA -> (.., d) in `out` (f32, bf16 or f16) =
/// x · rsqrt(mean(x²) + eps) · w, differentiable in x (gradient f32) and w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, out: DType) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !x.device().is_cuda() || x.dtype() != DType::F32 || w.dtype() != DType::F32 || w.dims() != [d] {
        return Err(Error::Invalid(format!(
            "rms norm: needs f32 (.., d) CUDA input and (d) f32 weight, got {:?} {:?} on {:?} and {:?} {:?}",
            x.dims(),
            x.dtype(),
            x.device(),
            w.dims(),
            w.dtype()
        )));
    }
    suffix(out)?;
    if d == 0 || d > i32::MAX as usize {
        return Err(Error::Invalid(format!("rms norm: row width {d} is out of range")));
    }
    let rows = x.elem_count() / d;
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(RmsNormOp {
        rows,
        d,
        eps: eps as f32,
        out,
    }));
    let x2 = x.contiguous()?.reshape((rows, d))?; // (rows, d)
    let y = x2.apply_op2_arc(&w.contiguous()?, op)?; // (rows, d) out
    Ok(y.reshape(x.dims())?)
}

/// The op's backward without autograd (a half-block backward that runs its own, as
/// `ops::mamba_block_grad`): x (rows, d) f32, w (d) f32, dy (rows, d) the gradient of
/// `rms_norm(x, w, eps, out)` -> dx (rows, d) f32 and, with `want_dw`, dw (d) f32.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, out: DType, dy: &Tensor, want_dw: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, d) = x.dims2()?;
    let op = RmsNormOp {
        rows,
        d,
        eps: eps as f32,
        out,
    };
    op.backward(x, w, dy, want_dw)
}

/// The op: x (rows, d) f32, w (d) f32 -> y (rows, d) in `out`.
struct RmsNormOp {
    rows: usize,
    d: usize,
    eps: f32,
    out: DType,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the rms-norm-cuda op runs on CUDA only; the CPU takes the tensor-op path")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (xp, wp) = (f32_ptr(s1, l1, "rms norm")?, f32_ptr(s2, l2, "rms norm")?);
        let n = self.rows * self.d;
        let (y, yp) = match self.out {
            DType::F32 => {
                let y = dev.alloc_zeros::<f32>(n)?;
                let p = y.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(y, dev.clone()), p)
            }
            DType::BF16 => {
                let y = dev.alloc_zeros::<half::bf16>(n)?;
                let p = y.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(y, dev.clone()), p)
            }
            DType::F16 => {
                let y = dev.alloc_zeros::<half::f16>(n)?;
                let p = y.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(y, dev.clone()), p)
            }
            other => candle_core::bail!("rms norm: no kernel for output {other:?}"),
        };
        let sfx = suffix(self.out).map_err(to_candle)?;
        let params = RmsNormFwdParams {
            x: xp,
            w: wp,
            y: yp,
            rows: to_i64(self.rows, "rms norm rows").map_err(to_candle)?,
            d: to_i32(self.d, "rms norm width").map_err(to_candle)?,
            eps: self.eps,
        };
        // SAFETY: x and w address the op's contiguous (rows, d) and (d) f32 inputs (checked by
        // f32_ptr), y the (rows, d) output just allocated; all live until the launch completes
        // (candle keeps the inputs, y is returned).
        unsafe {
            Launch::new(
                func(&dev, Module::RmsNorm, &format!("rms_norm_fwd_{sfx}")).map_err(to_candle)?,
                (self.rows.clamp(1, 1 << 20) as u32, 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("rms-norm")
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((y, Shape::from((self.rows, self.d))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, w, grad, w.track_op()).map_err(to_candle)?;
        Ok((Some(dx), dw))
    }
}

impl RmsNormOp {
    /// x (rows, d) f32, w (d) f32, dy (rows, d) -> dx (rows, d) f32 and, with `want_dw` (w is
    /// trained), dw (d) f32.
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor, want_dw: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, d) = (self.rows, self.d);
        let dev = x.device();
        let cd = cuda_device(dev)?;
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        let g = grad.to_dtype(self.out)?.contiguous()?; // (rows, d) out
        let dx = empty(&[rows, d], DType::F32, dev)?; // (rows, d)
        let blocks = (sm_count(cd)? * BWD_BLOCKS_PER_SM).clamp(1, rows.max(1) as u32);
        let smem_acc = d <= MAX_SMEM_D;
        // (blocks, d): each block's Σ g · x̂ over its rows; only when w is trained
        let part = if want_dw {
            Some(empty(&[blocks as usize, d], DType::F32, dev)?)
        } else {
            None
        };
        let stream = cd.cuda_stream();
        let params = RmsNormBwdParams {
            x: dptr(&x)?,
            w: dptr(&w)?,
            g: dptr(&g)?,
            dx: dptr(&dx)?,
            part: part.as_ref().map_or(Ok(0), dptr)?,
            rows: to_i64(rows, "rms norm rows")?,
            d: to_i32(d, "rms norm width")?,
            eps: self.eps,
            smem_acc: i32::from(smem_acc),
        };
        // SAFETY: x (rows, d) f32, w (d) f32, g (rows, d) out-dtype and dx (rows, d) f32 are the
        // contiguous tensors above, part (blocks, d) f32 or null; all are held by this function
        // until it returns, and candle's stream orders their release after the launch.
        unsafe {
            Launch::new(
                func(cd, Module::RmsNorm, &format!("rms_norm_bwd_{}", suffix(self.out)?))?,
                (blocks, 1, 1),
                THREADS,
                if smem_acc && part.is_some() { (d * 4) as u32 } else { 0 },
            )
            .params(params)
            .label("rms-norm-bwd")
            .run(&stream)
        }?;
        let Some(part) = part else {
            return Ok((dx, None));
        };
        let dw = empty(&[d], DType::F32, dev)?; // (d)
        let params = RmsNormDwParams {
            part: dptr(&part)?,
            dw: dptr(&dw)?,
            nb: to_i32(blocks as usize, "rms norm blocks")?,
            d: to_i32(d, "rms norm width")?,
        };
        // SAFETY: part (blocks, d) and dw (d) are the f32 tensors above, live until they drop
        // after the launch is queued (candle's stream orders the release).
        unsafe {
            Launch::new(func(cd, Module::RmsNorm, "rms_norm_dw")?, (d.div_ceil(32) as u32, 1, 1), 256, 0)
                .params(params)
                .label("rms-norm-dw")
                .run(&stream)
        }?;
        Ok((dx, Some(dw)))
    }
}
