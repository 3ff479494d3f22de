//! The fused RMSNorm (`ops::rms_norm`, kernels/rms_norm.cu) against its twin, the tensor ops of
//! `model::linear::rms_norm(.., differentiable = true)` then `to_dtype`, on the same CUDA device:
//! the output and the gradients in x and w of a random weighted sum, f32 and bf16 output,
//! d ∈ {64, 2560, 2563 (odd), 12,300 (dw accumulated outside shared memory)}, row counts that
//! fill no whole wave of backward blocks (several rows per block among them); dw is
//! deterministic (bitwise equal over two runs). Runs only in a `--features cuda` build, and skips
//! (passes, saying so) on a machine without an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use std::time::Instant;

use blackmamba::model::linear::rms_norm as twin_norm;
use blackmamba::ops::rms_norm::rms_norm;
use candle_core::{DType, Tensor, Var};
use gpu_common::{device, host, rel};

/// bf16 keeps 8 significant bits: rounding an f32 value to it moves it by at most 2⁻⁸ of itself.
const BF16_ROUNDING: f32 = 1.0 / 256.0;
/// f32: the same math, the terms of the row sums (and of dw's sum over rows) added in a
/// different order, rsqrt for 1 / sqrt.
const F32_TOL: f32 = 1e-5;
const EPS: f64 = 1e-5;

/// y = f(x, w), and the gradients in x and w of Σ y ⊙ c (c f32; y read back as f32).
fn run(x: &Tensor, w: &Tensor, c: &Tensor, f: impl Fn(&Tensor, &Tensor) -> Tensor) -> (Tensor, Tensor, Tensor) {
    let xv = Var::from_tensor(x).unwrap();
    let wv = Var::from_tensor(w).unwrap();
    let y = f(xv.as_tensor(), wv.as_tensor());
    let loss = (y.to_dtype(DType::F32).unwrap() * c).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let dx = g.get(xv.as_tensor()).unwrap().clone();
    let dw = g.get(wv.as_tensor()).unwrap().clone();
    (y.detach(), dx, dw)
}

#[test]
fn rms_norm_matches_its_twin() {
    let Some(dev) = device() else { return };
    let mut bad = Vec::new();
    // (batch, len, d): 39 rows (fewer rows than backward blocks) and 1,055 (1 or 2 rows a block
    // on an H200's 528 blocks, and not a multiple of any block count)
    let shapes = [
        (3, 13, 64),
        (5, 211, 64),
        (3, 13, 2560),
        (5, 211, 2560),
        (3, 13, 2563),
        (5, 211, 2563),
        (2, 150, 12_300),
    ];
    for (b, l, d) in shapes {
        // an offset residual with a spread of row scales, weights around 1
        let scale = Tensor::rand(0.2f32, 4.0, (b, l, 1), &dev).unwrap();
        let x = (Tensor::randn(0.3f32, 1.0, (b, l, d), &dev).unwrap().broadcast_mul(&scale)).unwrap();
        let w = Tensor::randn(1f32, 0.2, d, &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let (y, dx, dw) = run(&x, &w, &c, |x, w| rms_norm(x, w, EPS, dt).unwrap());
            let (yt, dxt, dwt) = run(&x, &w, &c, |x, w| twin_norm(x, w, EPS, true).unwrap().to_dtype(dt).unwrap());
            assert_eq!(y.dtype(), dt);
            assert_eq!(dx.dtype(), DType::F32);
            assert_eq!(dw.dtype(), DType::F32);
            // bf16: both round the same f32 value (up to F32_TOL) once, so at most one bf16 step
            // (2⁻⁷ of the value) apart; the gradients are the same bf16 values of c in both, the
            // math f32
            let y_tol = if dt == DType::F32 { F32_TOL } else { 2.0 * BF16_ROUNDING };
            for (what, r, tol) in [
                ("y", rel(&y, &yt), y_tol),
                ("dx", rel(&dx, &dxt), F32_TOL),
                ("dw", rel(&dw, &dwt), F32_TOL),
            ] {
                eprintln!("({b}, {l}, {d}) {dt:?} {what}: rel {r:.2e}");
                if r.is_nan() || r > tol {
                    bad.push(format!("({b}, {l}, {d}) {dt:?} {what}: {r:.2e} > {tol:.0e}"));
                }
            }
            // deterministic dw: no atomics, a fixed summation order
            let (_, dx2, dw2) = run(&x, &w, &c, |x, w| rms_norm(x, w, EPS, dt).unwrap());
            if host(&dw2) != host(&dw) || host(&dx2) != host(&dx) {
                bad.push(format!("({b}, {l}, {d}) {dt:?}: two runs differ"));
            }
        }
    }
    // a frozen weight (LoRA): no dw, the same dx
    let x = Tensor::randn(0f32, 1.0, (4, 33, 2560), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.2, 2560, &dev).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = rms_norm(xv.as_tensor(), &w, EPS, DType::BF16).unwrap();
    let g = y.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none());
    let xt = Var::from_tensor(&x).unwrap();
    let yt = twin_norm(xt.as_tensor(), &w, EPS, true).unwrap().to_dtype(DType::BF16).unwrap();
    let gt = yt.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    let r = rel(g.get(xv.as_tensor()).unwrap(), gt.get(xt.as_tensor()).unwrap());
    eprintln!("frozen w dx: rel {r:.2e}");
    if r.is_nan() || r > F32_TOL {
        bad.push(format!("frozen w dx: {r:.2e}"));
    }
    assert!(bad.is_empty(), "mismatches: {bad:?}");
}

/// Forward + backward at 2.8B's training shape (8,192 rows of 2,560, bf16 out), best of 5.
#[test]
fn timing() {
    let Some(dev) = device() else { return };
    let (n, d) = (8192, 2560);
    let x = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.2, d, &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let time = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
        let (mut fwd, mut all) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            dev.synchronize().unwrap();
            let t0 = Instant::now();
            let y = f(xv.as_tensor(), wv.as_tensor());
            dev.synchronize().unwrap();
            fwd = fwd.min(t0.elapsed().as_secs_f64() * 1e3);
            let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            drop(g);
            dev.synchronize().unwrap();
            all = all.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        (fwd, all)
    };
    let (tf, ta) = time(&|x, w| twin_norm(x, w, EPS, true).unwrap().to_dtype(DType::BF16).unwrap());
    let (ff, fa) = time(&|x, w| rms_norm(x, w, EPS, DType::BF16).unwrap());
    eprintln!("({n}, {d}) rms norm -> bf16: twin fwd {tf:.3} ms, fwd+bwd {ta:.3} ms; fused fwd {ff:.3} ms, fwd+bwd {fa:.3} ms");
}
