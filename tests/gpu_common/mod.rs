//! Helpers of the GPU parity tests of single fused ops (`*_gpu.rs`, compiled with `--features
//! cuda`): the device, host copies and the relative difference they compare by.
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};

/// The first CUDA device, or None (the test then passes with a note: no GPU on this machine).
pub fn device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// A tensor's values on the host, as f32.
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max |b| (NaN when either holds a NaN).
pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (host(a), host(b));
    if a.iter().chain(&b).any(|x| x.is_nan()) {
        return f32::NAN;
    }
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let s = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    d / s.max(1e-6)
}
