//! The fused cross-entropy (`ops::xent`, kernels/xent.cu) against its twin
//! `finetune::loss::nll_sum_slow` (log-softmax + gather) on the same device: per-row losses, the
//! summed loss and the gradient of a row-weighted sum, f32 and bf16 logits, vectorised and scalar
//! rows, V = 50,280, row counts that fill no whole wave, logits up to ±80. Runs only in a
//! `--features cuda` build, and skips (passes, saying so) on a machine without an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use std::time::Instant;

use blackmamba::finetune::loss::{nll_sum, nll_sum_slow};
use blackmamba::ops::xent::cross_entropy;
use candle_core::{DType, Device, Tensor, Var, D};
use gpu_common::{device, host, rel};

/// bf16 keeps 8 significant bits: rounding an f32 value to it moves it by at most 2⁻⁸ of itself.
const BF16_ROUNDING: f32 = 1.0 / 256.0;
/// f32: the two paths add the same terms in a different order (and the twin subtracts the max
/// before the logsumexp where the op rescales a running sum).
const F32_TOL: f32 = 1e-5;

/// A small deterministic generator (targets, weights).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Logits (n, V) f32 whose rows range from gentle (σ = 1) to ±80 (σ = 40, clamped), a few rows
/// with their target at +80 and everything else at −80 (loss ≈ 0), and their targets.
fn case(n: usize, v: usize, seed: u64, dev: &Device) -> (Tensor, Tensor) {
    let mut rng = Lcg(seed);
    let scales: Vec<f32> = (0..n).map(|r| [1.0, 8.0, 40.0][r % 3]).collect();
    let s = Tensor::from_vec(scales, (n, 1), dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (n, v), dev).unwrap().broadcast_mul(&s).unwrap();
    let x = x.clamp(-80f32, 80f32).unwrap();
    let t: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let mut xs = host(&x);
    for r in (0..n).step_by(7) {
        let row = &mut xs[r * v..(r + 1) * v];
        row.iter_mut().for_each(|e| *e = -80.0);
        row[t[r] as usize] = 80.0;
    }
    let x = Tensor::from_vec(xs, (n, v), dev).unwrap();
    (x, Tensor::from_vec(t, n, dev).unwrap())
}

/// The twin's per-row losses: −log_softmax(x)[target] (n), in x's dtype.
fn rows_slow(x: &Tensor, t: &Tensor) -> Tensor {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1).unwrap();
    logp.gather(&t.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap()
}

/// Per-row losses (f32) and the gradient of Σ_r w_r·loss_r at x.
fn run(x: &Tensor, t: &Tensor, w: &Tensor, f: impl Fn(&Tensor, &Tensor) -> Tensor) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let rows = f(v.as_tensor(), t);
    let loss = rows.to_dtype(DType::F32).unwrap().mul(w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
    (rows.to_dtype(DType::F32).unwrap().detach(), g)
}

const SHAPES: [(usize, usize); 5] = [(3, 7), (37, 1003), (64, 4096), (5, 50_280), (257, 50_280)];

#[test]
fn fused_cross_entropy_matches_its_twin() {
    let Some(dev) = device() else { return };
    let mut bad = Vec::new();
    for (i, &(n, v)) in SHAPES.iter().enumerate() {
        let (x, t) = case(n, v, 11 + i as u64, &dev);
        let w = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let fused = |x: &Tensor, t: &Tensor| cross_entropy(x, t).unwrap();

        // f32: the same math in a different order
        let (l, g) = run(&x, &t, &w, fused);
        let (ls, gs) = run(&x, &t, &w, rows_slow);
        let sum = nll_sum(&x, &t, true).unwrap();
        let sum_slow = nll_sum_slow(&x, &t).unwrap();
        for (what, r) in [
            ("loss rows", rel(&l, &ls)),
            ("nll_sum", rel(&sum, &sum_slow)),
            ("grad", rel(&g, &gs)),
        ] {
            eprintln!("({n}, {v}) f32 {what}: rel {r:.2e}");
            if r.is_nan() || r > F32_TOL {
                bad.push(format!("({n}, {v}) f32 {what}: {r:.2e}"));
            }
        }

        // bf16 logits: the reference is the twin in f32 on the same (bf16) values. The op reads
        // them in f32, so its losses are as close as in f32, and it rounds each gradient element
        // once to bf16: within 2⁻⁸ of the reference. The twin in bf16 rounds every intermediate
        // (log-softmax included); the fused op must not be further from the reference than it.
        let x16 = x.to_dtype(DType::BF16).unwrap();
        let (l16, g16) = run(&x16, &t, &w, fused);
        let (ls16, gs16) = run(&x16, &t, &w, rows_slow);
        let (lr, gr) = run(&x16.to_dtype(DType::F32).unwrap(), &t, &w, rows_slow);
        assert_eq!((l16.dtype(), g16.dtype()), (DType::F32, DType::BF16));
        let (fl, sl) = (rel(&l16, &lr), rel(&ls16, &lr));
        let (fg, sg) = (rel(&g16, &gr), rel(&gs16, &gr));
        let fs = rel(&g16, &gs16);
        eprintln!("({n}, {v}) bf16 loss rows: fused rel {fl:.2e}, twin rel {sl:.2e} (to f32)");
        eprintln!("({n}, {v}) bf16 grad: fused rel {fg:.2e}, twin rel {sg:.2e} (to f32); fused to twin {fs:.2e}");
        if fl.is_nan() || fl > F32_TOL {
            bad.push(format!("({n}, {v}) bf16 loss rows: {fl:.2e}"));
        }
        if fg.is_nan() || fg > BF16_ROUNDING + F32_TOL || fg > sg.max(BF16_ROUNDING) * 1.01 {
            bad.push(format!("({n}, {v}) bf16 grad: fused {fg:.2e}, twin {sg:.2e}"));
        }
        // the direct comparison: both sit within their own error of the reference
        if fs.is_nan() || fs > sg + BF16_ROUNDING + F32_TOL {
            bad.push(format!("({n}, {v}) bf16 grad fused vs twin: {fs:.2e}"));
        }
    }
    assert!(bad.is_empty(), "mismatches: {bad:?}");
}

#[test]
fn target_outside_the_classes_is_an_error() {
    let Some(dev) = device() else { return };
    let (x, _) = case(4, 1000, 3, &dev);
    let t = Tensor::new(&[0u32, 5, 1000, 2], &dev).unwrap();
    let e = cross_entropy(&x, &t).unwrap_err().to_string();
    assert!(e.contains("1000"), "{e}");
    assert!(nll_sum(&x.to_dtype(DType::BF16).unwrap(), &t, true).is_err());
}

/// Not a check: forward + backward times of the head's loss at a training shape (8,192 rows of
/// 50,280), the old path (bf16 logits cast to f32, then the twin) against the op on bf16 logits.
#[test]
fn timing() {
    let Some(dev) = device() else { return };
    let (n, v) = (8192, 50_280);
    let x16 = (Tensor::randn(0f32, 4.0, (n, v), &dev).unwrap()).to_dtype(DType::BF16).unwrap();
    let t = Tensor::from_vec((0..n as u32).map(|i| (i * 7919) % v as u32).collect::<Vec<_>>(), n, &dev).unwrap();
    let time = |f: &dyn Fn(&Tensor) -> Tensor| {
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let var = Var::from_tensor(&x16).unwrap();
            dev.synchronize().unwrap();
            let t0 = Instant::now();
            let g = f(var.as_tensor()).backward().unwrap();
            drop(g);
            dev.synchronize().unwrap();
            best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        best
    };
    let old = time(&|x| nll_sum_slow(&x.to_dtype(DType::F32).unwrap(), &t).unwrap());
    let new = time(&|x| nll_sum(x, &t, true).unwrap());
    eprintln!("({n}, {v}) loss fwd+bwd: f32 cast + twin {old:.2} ms, fused on bf16 {new:.2} ms");
}
