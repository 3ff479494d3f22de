//! Sinkhorn on the device (`kernels/sinkhorn.cu`): the whole loop in one launch of one block, in
//! f64, with the same trace as the host version. Twin: [`crate::sinkhorn::sinkhorn`].
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, empty, func, Launch, Module};
use crate::ops::params::{to_i32, SinkhornParams};
use crate::sinkhorn::{SinkhornIter, SinkhornOpts, SinkhornResult, Variant};

/// Runs Sinkhorn on router logits `cost` (T, E) f32 on a CUDA device. E must be at most 32.
pub fn sinkhorn(cost: &Tensor, opts: &SinkhornOpts) -> Result<SinkhornResult> {
    let (t, e) = cost.dims2()?;
    if t == 0 || e == 0 {
        return Ok(crate::sinkhorn::sinkhorn(&[], t, e, opts));
    }
    if e > 32 {
        return Err(Error::Invalid(format!("device Sinkhorn: {e} experts; at most 32")));
    }
    let dev = cost.device();
    let cd = cuda_device(dev)?;
    let cost = cost.to_dtype(DType::F32)?.contiguous()?;
    let iters = opts.max_iters;
    let k = empty(&[t * e], DType::F64, dev)?;
    let d0 = empty(&[t], DType::F64, dev)?;
    let plan = empty(&[t, e], DType::F32, dev)?;
    let assign = empty(&[t], DType::U32, dev)?;
    let trace = Tensor::zeros(iters.max(1) * 4, DType::F64, dev)?;
    let status = Tensor::zeros(2, DType::U32, dev)?;
    let (scale, zyphra) = match opts.variant {
        Variant::Zyphra => (2.0, 1),
        Variant::Standard => (1.0, 0),
    };
    let params = SinkhornParams {
        cost: dptr(&cost)?,
        K: dptr(&k)?,
        d0: dptr(&d0)?,
        plan: dptr(&plan)?,
        assign: dptr(&assign)?,
        trace: dptr(&trace)?,
        status: dptr(&status)?,
        scale,
        tol: opts.tol,
        T: to_i32(t, "device Sinkhorn: tokens")?,
        E: to_i32(e, "device Sinkhorn: experts")?,
        zyphra,
        max_iters: to_i32(iters, "device Sinkhorn: iterations")?,
    };
    // SAFETY: cost (T, E) f32, K (T·E) f64, d0 (T) f64, plan (T, E) f32, assign (T) u32,
    // trace (max(iters, 1)·4) f64 and status (2) u32 (read as int) are the contiguous tensors
    // above, all live until the results are read back below.
    unsafe {
        Launch::new(func(cd, Module::Sinkhorn, "sinkhorn_run")?, (1, 1, 1), 1024, 0)
            .params(params)
            .run(&cd.cuda_stream())
    }?;
    let status: Vec<u32> = status.to_vec1()?;
    let n = (status[0] as usize).min(iters);
    let tr: Vec<f64> = trace.to_vec1()?;
    Ok(SinkhornResult {
        n_tokens: t,
        n_experts: e,
        plan: plan.flatten_all()?.to_vec1()?,
        assignment: assign.to_vec1()?,
        trace: tr
            .chunks(4)
            .take(n)
            .map(|c| SinkhornIter {
                abs_change: c[0],
                rel_change: c[1],
                row_err: c[2],
                col_err: c[3],
            })
            .collect(),
        converged: status[1] != 0,
    })
}
