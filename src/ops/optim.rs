//! The optimiser step of fine-tuning on CUDA (`kernels/optim.cu`): AdamW in one pass over each
//! parameter, in place, and the gradients' sum of squares into one f64 read once per step.
//! Slow twins: [`crate::finetune::optim::AdamW::step_ops`] and
//! [`crate::finetune::optim::global_norm_ops`]; parity in `tests/gpu_parity.rs`.
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{blocks_for, cuda_device, dptr, func, sm_count, Launch, Module};
use crate::ops::params::{AdamwParams, SumsqParams};

/// The scalars of one AdamW update (bias corrections bc1 = 1 − β₁ᵗ, bc2 = 1 − β₂ᵗ; decay =
/// 1 − lr · weight decay, or 1; gscale multiplies the gradient: clipping).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub decay: f64,
    pub gscale: f64,
}

fn check_f32(what: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.dtype() != DType::F32 || !t.device().is_cuda() || !t.is_contiguous() || t.elem_count() != n {
        return Err(Error::Invalid(format!(
            "fused AdamW: {what} must be a contiguous f32 CUDA tensor of {n} values (got {:?} {:?})",
            t.dtype(),
            t.shape()
        )));
    }
    Ok(())
}

/// w, m, v (f32, contiguous, distinct storage) updated in place from the gradient g; with
/// `cast`, that tensor (contiguous, bf16 or f16, as many values: the model's copy of w) is
/// overwritten with the updated w in its dtype, in the same pass.
pub fn adamw(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &AdamStep, cast: Option<&Tensor>) -> Result<()> {
    let n = w.elem_count();
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    for (what, t) in [
        ("the weight", w),
        ("the gradient", &g),
        ("the first moment", m),
        ("the second moment", v),
    ] {
        check_f32(what, t, n)?;
    }
    let (wc, wc_kind) = match cast {
        None => (0, 0),
        Some(c) => {
            let kind = match c.dtype() {
                DType::BF16 => 1,
                DType::F16 => 2,
                other => return Err(Error::Invalid(format!("fused AdamW: cannot write a {other:?} copy of the weight"))),
            };
            if !c.device().is_cuda() || !c.is_contiguous() || c.elem_count() != n {
                return Err(Error::Invalid(format!(
                    "fused AdamW: the weight's copy must be a contiguous CUDA tensor of {n} values (got {:?})",
                    c.shape()
                )));
            }
            (dptr(c)?, kind)
        }
    };
    if n == 0 {
        return Ok(());
    }
    let cd = cuda_device(w.device())?;
    let cap = sm_count(cd)? * 8;
    let params = AdamwParams {
        w: dptr(w)?,
        g: dptr(&g)?,
        m: dptr(m)?,
        v: dptr(v)?,
        wc,
        n: n as u64,
        lr: s.lr as f32,
        b1: s.beta1 as f32,
        b2: s.beta2 as f32,
        bc1: s.bc1 as f32,
        bc2: s.bc2 as f32,
        eps: s.eps as f32,
        decay: s.decay as f32,
        gscale: s.gscale as f32,
        wc_kind,
    };
    // SAFETY: w, g, m and v are contiguous f32 CUDA tensors of n values each and wc a
    // contiguous copy of n values in the dtype wc_kind names (all checked above); the caller
    // holds them until the step is queued, and candle's stream orders their release after it.
    unsafe {
        Launch::new(func(cd, Module::Optim, "adamw_f32")?, (blocks_for(n, 256, cap), 1, 1), 256, 0)
            .params(params)
            .run(&cd.cuda_stream())
    }
}

/// Σ over all gradients of g², accumulated on the device in f64 and read once.
pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    let Some(first) = grads.first() else { return Ok(0.0) };
    let dev = first.device();
    let cd = cuda_device(dev)?;
    let cap = sm_count(cd)? * 4;
    let acc = Tensor::zeros(1, DType::F64, dev)?;
    let f = func(cd, Module::Optim, "sumsq_f32")?;
    for g in grads {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let n = g.elem_count();
        if n == 0 {
            continue;
        }
        let params = SumsqParams {
            g: dptr(&g)?,
            acc: dptr(&acc)?,
            n: n as u64,
        };
        // SAFETY: g is the contiguous f32 copy above (n values), acc the (1) f64 tensor above;
        // both live until the sum is read back below.
        unsafe {
            Launch::new(f.clone(), (blocks_for(n, 256, cap), 1, 1), 256, 0)
                .params(params)
                .run(&cd.cuda_stream())
        }?;
    }
    Ok(acc.to_vec1::<f64>()?[0])
}
