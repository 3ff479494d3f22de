//! The training loss's cross-entropy as one autograd op on the GPU (kernels/xent.cu).
//!
//! Its twin, [`crate::finetune::loss::nll_sum_slow`] (log-softmax + gather), makes several full
//! passes over the (n, V) logits forward (max, exp, sum, log, subtract) and as many backward, each
//! writing an (n, V) f32 tensor. The op reads the logits once forward, keeping only the per-row
//! logsumexp, and once backward, writing the gradient once, in the logits' dtype: f32, or bf16 /
//! f16 straight from the head's matmul (no f32 copy of the logits). Math in f32 for every dtype.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, empty, func, storage_ptr, suffix, to_candle, Launch, Module};
use crate::ops::params::{to_i32, XentBwdParams, XentFwdParams};

const THREADS: u32 = 256;

/// logits (n, V) f32, bf16 or f16 and targets (n) u32, on CUDA -> (n) f32 with
/// logsumexp(row) − row\[target\], differentiable in the logits (gradient in their dtype).
/// Targets outside [0, V) are an error (checked on the host: one reduction and a 4-byte copy).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if !logits.device().is_cuda() || targets.dtype() != DType::U32 || targets.dims() != [n] {
        return Err(Error::Invalid(format!(
            "cross-entropy: needs (n, V) CUDA logits and (n) u32 targets, got {:?} on {:?} and {:?} {:?}",
            logits.dims(),
            logits.device(),
            targets.dims(),
            targets.dtype()
        )));
    }
    suffix(logits.dtype())?;
    if v > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::Invalid(format!("cross-entropy: {n} rows of {v} classes is too large")));
    }
    if n > 0 {
        let top = targets.max(0)?.to_scalar::<u32>()?;
        if top as usize >= v {
            return Err(Error::TokenOutOfVocab { id: top, vocab: v });
        }
    }
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(CrossEntropyOp { n, v }));
    let out = logits.contiguous()?.apply_op2_arc(&targets.contiguous()?, op)?; // (n, 2): loss, lse
    Ok(out.narrow(1, 0, 1)?.squeeze(1)?) // (n)
}

/// The op: (n, V) logits, (n) targets -> (n, 2) f32 rows of (loss, logsumexp); the second column
/// is what the backward kernel reads instead of a second pass over the row.
struct CrossEntropyOp {
    n: usize,
    v: usize,
}

/// 1 when rows of `v` elements of `dtype` at these addresses can be read as 16-byte vectors.
fn vec_flag(v: usize, dtype: DType, ptrs: &[u64]) -> i32 {
    let k = 16 / dtype.size_in_bytes();
    i32::from(v % k == 0 && ptrs.iter().all(|p| p % 16 == 0))
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross-entropy-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cross-entropy-cuda op runs on CUDA only; the CPU has its own op")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if s2.dtype() != DType::U32 {
            candle_core::bail!("cross-entropy: targets must be u32, got {:?}", s2.dtype());
        }
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (xp, tp) = (storage_ptr(s1, l1, "cross-entropy")?, storage_ptr(s2, l2, "cross-entropy")?);
        let out = dev.alloc_zeros::<f32>(self.n * 2)?; // (n, 2)
        let op = out.device_ptr(&stream).0;
        let sfx = suffix(s1.dtype()).map_err(to_candle)?;
        let params = XentFwdParams {
            logits: xp,
            targets: tp,
            out: op,
            v: to_i32(self.v, "cross-entropy: vocabulary").map_err(to_candle)?,
            vec: vec_flag(self.v, s1.dtype(), &[xp]),
        };
        // SAFETY: logits (n, V) and targets (n) u32 are the op's contiguous inputs (storage_ptr
        // checks), out the (n, 2) f32 buffer just allocated (returned).
        unsafe {
            Launch::new(
                func(&dev, Module::Xent, &format!("xent_fwd_{sfx}")).map_err(to_candle)?,
                (self.n as u32, 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("xent")
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((self.n, 2))))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.backward(logits, targets, res, grad).map_err(to_candle)?;
        Ok((Some(d), None))
    }
}

impl CrossEntropyOp {
    /// logits (n, V), targets (n), res (n, 2) = (loss, lse), grad (n, 2) -> d logits (n, V) in
    /// the logits' dtype (the lse column's gradient is ignored: nothing differentiates it).
    fn backward(&self, logits: &Tensor, targets: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, v) = (self.n, self.v);
        let dev = logits.device();
        let cd = cuda_device(dev)?;
        let x = logits.contiguous()?;
        let t = targets.contiguous()?;
        let res = res.to_dtype(DType::F32)?.contiguous()?; // (n, 2)
        let g = grad.to_dtype(DType::F32)?.contiguous()?; // (n, 2)
        let d = empty(&[n, v], x.dtype(), dev)?; // (n, V)
        let (xp, dp) = (dptr(&x)?, dptr(&d)?);
        let params = XentBwdParams {
            logits: xp,
            targets: dptr(&t)?,
            res: dptr(&res)?,
            grad: dptr(&g)?,
            dx: dp,
            v: to_i32(v, "cross-entropy: vocabulary")?,
            vec: vec_flag(v, x.dtype(), &[xp, dp]),
        };
        // SAFETY: logits (n, V), targets (n) u32, res and grad (n, 2) f32 and dx (n, V) are the
        // contiguous tensors above, held until this function returns (candle's stream orders
        // their release after the launch).
        unsafe {
            Launch::new(
                func(cd, Module::Xent, &format!("xent_bwd_{}", suffix(x.dtype())?))?,
                (n as u32, 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("xent-bwd")
            .run(&cd.cuda_stream())
        }?;
        Ok(d)
    }
}
