//! The gated activation of an expert MLP, h = act(a[:, :f]) ⊙ a[:, f:], as one autograd op for
//! fine-tuning on the GPU (kernels/gated_act.cu).
//!
//! Its twin, `Mlp::forward`'s tensor ops (two narrows, gelu_erf or SiLU, a product), writes the
//! activation and the product forward and, backward, a zero-padded full (n, 2f) tensor per
//! narrow plus the activation's own chain of elementwise tensors. The op keeps only `a`
//! and recomputes act(gate) in its backward kernel. Math in f32, stored in `a`'s dtype.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::ops::act::Activation;
use crate::ops::cuda::{blocks_for, cuda_device, dptr, empty, func, storage_ptr, suffix, to_candle, Launch, Module};
use crate::ops::params::{to_i32, to_i64, GatedActBwdParams, GatedActFwdParams, MoeActParams};

const THREADS: u32 = 256;
/// Grid cap of the grid-stride kernels.
const MAX_BLOCKS: u32 = 16 * 132;

/// a (n, 2f) in f32, bf16 or f16, on CUDA -> h (n, f) = act(a[:, :f]) ⊙ a[:, f:], differentiable.
pub fn gated_act(a: &Tensor, act: Activation) -> Result<Tensor> {
    let (n, f2) = a.dims2()?;
    if f2 % 2 != 0 || !a.device().is_cuda() {
        return Err(Error::Invalid(format!(
            "gated activation: needs an even-width (n, 2f) CUDA tensor, got {:?} on {:?}",
            a.dims(),
            a.device()
        )));
    }
    suffix(a.dtype())?;
    let op = GatedAct { n, f: f2 / 2, act };
    Ok(a.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?)
}

/// The op's backward without autograd (for a half-block backward that runs its own, as
/// `runtime::grad::moe_block`): a (n, 2f), dh (n, f) the gradient of `gated_act(a, act)` -> da (n, 2f)
/// in a's dtype.
pub fn gated_act_backward(a: &Tensor, act: Activation, dh: &Tensor) -> Result<Tensor> {
    let (n, f2) = a.dims2()?;
    GatedAct { n, f: f2 / 2, act }.backward(a, dh)
}

struct GatedAct {
    n: usize,
    f: usize,
    act: Activation,
}

impl CustomOp1 for GatedAct {
    fn name(&self) -> &'static str {
        "gated-act"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("gated-act op runs on CUDA only; the CPU uses the tensor-op twin")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (n, f) = (self.n, self.f);
        let stream = dev.cuda_stream();
        let ap = storage_ptr(s, l, "gated activation")?;
        let (h, hp) = match s.dtype() {
            DType::F32 => {
                let h = dev.alloc_zeros::<f32>(n * f)?;
                let p = h.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(h, dev.clone()), p)
            }
            DType::BF16 => {
                let h = dev.alloc_zeros::<half::bf16>(n * f)?;
                let p = h.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(h, dev.clone()), p)
            }
            DType::F16 => {
                let h = dev.alloc_zeros::<half::f16>(n * f)?;
                let p = h.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(h, dev.clone()), p)
            }
            other => candle_core::bail!("gated activation: no kernel for {other:?}"),
        };
        let sfx = suffix(s.dtype()).map_err(to_candle)?;
        let params = GatedActFwdParams {
            a: ap,
            h: hp,
            n: to_i64(n, "gated activation: rows").map_err(to_candle)?,
            f: to_i32(f, "gated activation: width").map_err(to_candle)?,
            act: self.act.code(),
        };
        // SAFETY: a is the op's contiguous (n, 2f) input, h the (n, f) buffer just allocated in
        // the same dtype (returned).
        unsafe {
            Launch::new(
                func(&dev, Module::GatedAct, &format!("gated_act_fwd_{sfx}")).map_err(to_candle)?,
                (blocks_for(n * f, THREADS, MAX_BLOCKS), 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("gated-act")
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((h, Shape::from((n, f))))
    }

    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.backward(a, grad).map(Some).map_err(to_candle)
    }
}

impl GatedAct {
    /// a (n, 2f), dh (n, f) -> da (n, 2f), in a's dtype.
    fn backward(&self, a: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, f) = (self.n, self.f);
        let dev = a.device();
        let cd = cuda_device(dev)?;
        let a = a.contiguous()?;
        let dh = grad.to_dtype(a.dtype())?.contiguous()?;
        let da = empty(&[n, 2 * f], a.dtype(), dev)?;
        let params = GatedActBwdParams {
            a: dptr(&a)?,
            dh: dptr(&dh)?,
            da: dptr(&da)?,
            n: to_i64(n, "gated activation: rows")?,
            f: to_i32(f, "gated activation: width")?,
            act: self.act.code(),
        };
        // SAFETY: a (n, 2f), dh (n, f) and da (n, 2f), all in a's dtype, are the contiguous
        // tensors above, held until this function returns (candle's stream orders their release
        // after the launch).
        unsafe {
            Launch::new(
                func(cd, Module::GatedAct, &format!("gated_act_bwd_{}", suffix(a.dtype())?))?,
                (blocks_for(n * f, THREADS, MAX_BLOCKS), 1, 1),
                THREADS,
                0,
            )
            .params(params)
            .label("gated-act-bwd")
            .run(&cd.cuda_stream())
        }?;
        Ok(da)
    }
}

/// The experts' gated activation by `moe_act_*`: fc1's output a (n, 2f) -> h (n, f) in a's dtype,
/// h = act(a[:, :f]) ⊙ a[:, f:] rounded as the twin rounds (`model::moe::Mlp::forward`).
pub fn gated_act_inference(a: &Tensor, act: Activation) -> Result<Tensor> {
    let a = a.contiguous()?;
    let (n, two_f) = a.dims2()?;
    let f = two_f / 2;
    let dt = a.dtype();
    let dev = a.device();
    let cd = cuda_device(dev)?;
    let h = empty(&[n, f], dt, dev)?;
    let params = MoeActParams {
        a: dptr(&a)?,
        h: dptr(&h)?,
        n: to_i32(n, "expert activation: rows")?,
        f: to_i32(f, "expert activation: width")?,
        act: act.code(),
    };
    // SAFETY: a (n, 2f) and h (n, f) in the same dtype are the contiguous tensors above, held
    // until this function returns (h is returned).
    unsafe {
        Launch::new(
            func(cd, Module::Prefill, &format!("moe_act_{}", suffix(dt)?))?,
            (f.div_ceil(256) as u32, n.min(65535) as u32, 1),
            256,
            0,
        )
        .params(params)
        .run(&cd.cuda_stream())
    }?;
    Ok(h)
}
