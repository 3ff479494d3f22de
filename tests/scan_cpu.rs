//! The CPU scan op (`ops::scan_cpu`) against its tensor-op twin (`ops::scan::selective_scan`):
//! outputs, last state and the gradients autograd gives each, and against central finite
//! differences; then a training step through it equals one through the twin.

#![allow(clippy::unwrap_used)]

mod ft_common;

use blackmamba::finetune::{Method, Trainer};
use blackmamba::ops::scan::selective_scan;
use blackmamba::ops::scan_cpu;
use candle_core::{DType, Device, Tensor, Var};

/// Random scan inputs: v, delta (> 0), a (< 0), b, c, h0.
fn inputs(bn: usize, len: usize, di: usize, n: usize, seed: u64, zero_h0: bool) -> [Tensor; 6] {
    let mut r = blackmamba::rng::Rng::new(seed);
    let mut t = |shape: &[usize], lo: f64, hi: f64| {
        let k: usize = shape.iter().product();
        let v: Vec<f32> = (0..k).map(|_| (lo + (hi - lo) * r.uniform()) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let v = t(&[bn, len, di], -1.0, 1.0);
    let delta = t(&[bn, len, di], 0.01, 0.6);
    let a = t(&[di, n], -4.0, -0.1);
    let b = t(&[bn, len, n], -1.0, 1.0);
    let c = t(&[bn, len, n], -1.0, 1.0);
    let h0 = if zero_h0 {
        Tensor::zeros((bn, di, n), DType::F32, &Device::Cpu).unwrap()
    } else {
        t(&[bn, di, n], -0.5, 0.5)
    };
    [v, delta, a, b, c, h0]
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / scale
}

/// y, last state and the gradients of Σ y·w w.r.t. (v, delta, a, b, c), by `op` or the twin.
fn run(x: &[Tensor; 6], w: &Tensor, op: bool) -> (Tensor, Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = x[..5].iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let out = if op {
        scan_cpu::selective_scan(t[0], t[1], t[2], t[3], t[4], &x[5]).unwrap()
    } else {
        selective_scan(t[0], t[1], t[2], t[3], t[4], &x[5], false).unwrap()
    };
    let g = (&out.y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect();
    (out.y, out.h_last, grads)
}

#[test]
fn op_matches_the_twin_values_state_and_gradients() {
    // lengths inside one twin chunk, across chunks (64), and work large enough for threads
    for (i, &(bn, len, di, n, zero)) in [
        (1, 1, 3, 2, true),
        (2, 5, 4, 4, false),
        (2, 70, 8, 16, false),
        (2, 130, 64, 8, true),
    ]
    .iter()
    .enumerate()
    {
        let x = inputs(bn, len, di, n, 10 + i as u64, zero);
        let w = inputs(bn, len, di, 1, 99, true)[0].clone();
        let (y1, h1, g1) = run(&x, &w, true);
        let (y0, h0, g0) = run(&x, &w, false);
        let what = format!("B {bn} L {len} di {di} N {n}");
        assert!(max_rel(&y1, &y0) < 1e-5, "{what}: y {}", max_rel(&y1, &y0));
        assert!(max_rel(&h1, &h0) < 1e-5, "{what}: h_last {}", max_rel(&h1, &h0));
        for (k, (a, b)) in g1.iter().zip(&g0).enumerate() {
            assert_eq!(a.dims(), b.dims());
            let e = max_rel(a, b);
            assert!(e < 1e-4, "{what}: gradient {} differs by {e}", ["v", "delta", "a", "b", "c"][k]);
        }
    }
}

#[test]
fn op_gradients_match_finite_differences() {
    let x = inputs(2, 9, 3, 4, 5, false);
    let w = inputs(2, 9, 3, 1, 6, true)[0].clone();
    let (_, _, grads) = run(&x, &w, true);
    let loss = |x: &[Tensor; 6]| -> f64 {
        let y = scan_cpu::selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5]).unwrap().y;
        let v: Vec<f32> = (&y * &w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|&x| f64::from(x)).sum()
    };
    let eps = 1e-2f32;
    for (k, g) in grads.iter().enumerate() {
        let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0, gv.len() / 2, gv.len() - 1] {
            let shift = |s: f32| {
                let mut y = x.clone();
                let mut flat: Vec<f32> = y[k].flatten_all().unwrap().to_vec1().unwrap();
                flat[idx] += s;
                y[k] = Tensor::from_vec(flat, y[k].dims(), &Device::Cpu).unwrap();
                loss(&y)
            };
            let fd = (shift(eps) - shift(-eps)) / (2.0 * f64::from(eps));
            let an = f64::from(gv[idx]);
            assert!(
                (fd - an).abs() <= 2e-3 * (1.0 + an.abs()),
                "input {k} element {idx}: finite difference {fd}, op {an}"
            );
        }
    }
}

#[test]
fn a_training_step_through_the_op_equals_one_through_the_twin() {
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let base = ft_common::model(&cfg, 4, true);
    let tok = ft_common::byte_tokenizer();
    let ex = blackmamba::bench::finetune::random_examples(4, 24, ft_common::VOCAB, 1);
    let mut reports = Vec::new();
    for use_kernels in [true, false] {
        let mut m = base.clone();
        m.kernels.enabled = use_kernels;
        let mut probe = m.clone();
        probe.differentiable = true;
        assert_eq!(probe.trains_with_fused_scan(), use_kernels);
        let mut fc = ft_common::run_config(Default::default(), Default::default(), Method::Full, 3);
        fc.seq_len = 24;
        fc.batch = 2;
        let mut t = Trainer::in_memory(&m, &tok, fc, ex.clone()).unwrap();
        reports.push((0..3).map(|_| t.step().unwrap()).collect::<Vec<_>>());
    }
    for (a, b) in reports[0].iter().zip(&reports[1]) {
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * b.loss,
            "step {}: loss {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() < 1e-4 * b.grad_norm,
            "step {}: |g| {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
        assert_eq!(a.expert_load, b.expert_load);
    }
}

#[test]
fn every_weight_gets_the_twins_gradient() {
    use blackmamba::finetune::data::{Batch, Example};
    use blackmamba::finetune::loss::batch_nll;
    use blackmamba::model::moe::Routing;
    use blackmamba::sinkhorn::SinkhornOpts;
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let ex = blackmamba::bench::finetune::random_examples(3, 12, ft_common::VOCAB, 2);
    let refs: Vec<&Example> = ex.iter().collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    let mut grads = Vec::new();
    for use_kernels in [true, false] {
        let mut m = ft_common::model(&cfg, 5, true);
        m.differentiable = true;
        m.kernels.enabled = use_kernels;
        m.routing = Routing::Sinkhorn(SinkhornOpts::default());
        let mut vars = Vec::new();
        m.visit_mut(&mut |n, t| {
            let v = Var::from_tensor(&t.detach())?;
            *t = v.as_tensor().clone();
            vars.push((n.to_string(), v));
            Ok(())
        })
        .unwrap();
        let g = batch_nll(&m, &batch, None).unwrap().backward().unwrap();
        grads.push(
            vars.iter()
                .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).unwrap().clone()))
                .collect::<Vec<_>>(),
        );
    }
    for ((name, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
        let e = max_rel(a, b);
        assert!(
            e < 1e-4,
            "{name}: gradient through the op differs from the twin's by {e} (relative to its largest)"
        );
    }
}

/// The inference scan (f32 loop, vectorised exp; no autograd) against the twin: y and the last
/// state, for N = 16 (the unrolled loop) and other N, zero and non-zero initial states, lengths
/// across the twin's chunks, and work large enough to split over threads.
#[test]
fn inference_scan_matches_the_twin() {
    for (i, &(bn, len, di, n, zero)) in [
        (1, 1, 3, 16, true),
        (2, 70, 8, 16, false),
        (2, 33, 5, 5, false),
        (1, 130, 600, 16, false),
    ]
    .iter()
    .enumerate()
    {
        let x = inputs(bn, len, di, n, 40 + i as u64, zero);
        let fast = blackmamba::ops::scan_cpu_infer::selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5]).unwrap();
        let twin = selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], false).unwrap();
        let (ey, eh) = (max_rel(&fast.y, &twin.y), max_rel(&fast.h_last, &twin.h_last));
        assert!(ey < 2e-5 && eh < 2e-5, "case {i}: y {ey:e}, last state {eh:e}");
        assert_eq!(fast.y.dims(), twin.y.dims());
    }
}
