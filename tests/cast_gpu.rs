//! The f32 <-> bf16 / f16 cast kernels installed as candle's cast hook (`ops::cast`) against
//! the host's conversions (the `half` crate: exact widening, round-to-nearest-even narrowing),
//! which candle's own kernel, the twin, also follows: sizes that are and are not multiples of
//! the kernel's eight elements a thread, and views at offsets the kernel leaves to candle.
//! Runs only in a `--features cuda` build on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use candle_core::{DType, Tensor};
use gpu_common::device;

#[test]
fn cast_kernels_convert_as_the_host_does() {
    let Some(dev) = device() else { return };
    blackmamba::ops::cast::install();
    for n in [1usize, 7, 8, 1000, 4099, 1 << 20] {
        // values across the ranges, with ties of the bf16 rounding
        let host: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37 - 50.0).sin() * 10f32.powi((i % 13) as i32 - 6) + (i % 3) as f32 * 1.0039062)
            .collect();
        let x = Tensor::from_vec(host.clone(), n, &dev).unwrap();
        for off in [0usize, 1] {
            if off >= n {
                continue;
            }
            let view = x.narrow(0, off, n - off).unwrap(); // offset 1: not 16-byte aligned: candle's kernel
            let want_bf: Vec<half::bf16> = host[off..].iter().map(|&v| half::bf16::from_f32(v)).collect();
            let bf = view.to_dtype(DType::BF16).unwrap();
            assert_eq!(bf.to_vec1::<half::bf16>().unwrap(), want_bf, "f32 -> bf16, n {n}, offset {off}");
            let want_back: Vec<f32> = want_bf.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                bf.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                want_back,
                "bf16 -> f32, n {n}"
            );
            let want_h: Vec<half::f16> = host[off..].iter().map(|&v| half::f16::from_f32(v)).collect();
            let h = view.to_dtype(DType::F16).unwrap();
            assert_eq!(h.to_vec1::<half::f16>().unwrap(), want_h, "f32 -> f16, n {n}, offset {off}");
            let want_hb: Vec<f32> = want_h.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                h.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                want_hb,
                "f16 -> f32, n {n}"
            );
        }
    }
}
