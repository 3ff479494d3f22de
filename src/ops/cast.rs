//! Casts between f32 and bf16 / f16 on the GPU for every `Tensor::to_dtype`, installed into the
//! vendored candle-core as its cast hook (vendor/candle-core/PATCH.md, patch 5).
//!
//! candle's own cast kernel converts one element a thread in blocks of 1,024 threads; on the H200
//! that moved a bf16 -> f32 cast at about 0.7 TB/s (Nsight Compute over a fine-tuning step of
//! the 2.8B shapes: 436 weight-gradient casts, 33 ms of the step's 285 ms of kernel time).
//! kernels/cast.cu converts eight elements a thread with 16-byte loads and stores. It takes
//! contiguous tensors whose input and output addresses are 16-byte aligned; any other layout or
//! dtype pair returns `None` and runs candle's kernel, the twin (tests/cast_gpu.rs compares the
//! two). The hook is process-wide by candle's design: the command line installs it once at
//! start-up (`--slow-cast` leaves it out); a library user calls [`install`].
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{set_cast_hook, CudaStorageSlice};
use candle_core::{CudaStorage, DType, Layout};

use crate::ops::cuda::{func, to_candle, Launch, Module};
use crate::ops::params::{to_i64, CastParams};

const THREADS: u32 = 256;

/// Installs the hook once per process (later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        set_cast_hook(cast);
    });
}

/// The device address of a storage's element `offset` and its element size.
fn address(s: &CudaStorage, offset: usize) -> candle_core::Result<(u64, usize)> {
    let stream = s.device().cuda_stream();
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, 2),
        _ => candle_core::bail!("cast hook: unexpected dtype {:?}", s.dtype()),
    };
    Ok((base + (offset * size) as u64, size))
}

/// The hook: `Some` for contiguous, aligned f32 <-> bf16 / f16 casts.
fn cast(s: &CudaStorage, layout: &Layout, to: DType) -> Option<candle_core::Result<CudaStorage>> {
    let name = match (s.dtype(), to) {
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::F32, DType::F16) => "cast_f32_f16",
        _ => return None,
    };
    if !layout.is_contiguous() || (address(s, layout.start_offset()).ok()?.0 % 16) != 0 {
        return None;
    }
    Some(run(s, layout, to, name))
}

fn run(s: &CudaStorage, layout: &Layout, to: DType, name: &str) -> candle_core::Result<CudaStorage> {
    let dev = s.device().clone();
    let n = layout.shape().elem_count();
    let (inp, _) = address(s, layout.start_offset())?;
    // SAFETY: the kernel writes all n elements before anything reads them.
    let out = match to {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n) }?, dev.clone()),
        other => candle_core::bail!("cast hook: no cast to {other:?}"),
    };
    if n == 0 {
        return Ok(out);
    }
    let (outp, _) = address(&out, 0)?;
    let blocks = n.div_ceil(8 * THREADS as usize).clamp(1, 1 << 16) as u32;
    let params = CastParams {
        src: inp,
        dst: outp,
        n: to_i64(n, "cast: elements").map_err(to_candle)?,
    };
    // SAFETY: in addresses the storage's n contiguous elements from its start offset (16-byte
    // aligned, checked by `cast`), out the n elements just allocated (returned); the kernel's
    // dtypes are the pair its name was picked for.
    unsafe {
        Launch::new(func(&dev, Module::Cast, name).map_err(to_candle)?, (blocks, 1, 1), THREADS, 0)
            .params(params)
            .label("cast")
            .run(&dev.cuda_stream())
    }
    .map_err(to_candle)?;
    Ok(out)
}
