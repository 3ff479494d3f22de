//! Parity of the fused CUDA kernels with their slow twins (the tensor-op path) and with the
//! reference fixture, f32 and bf16. Runs only in a `--features cuda` build on a machine with an
//! NVIDIA GPU (`cargo test --features cuda --test gpu_parity`).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
mod gpu_common;

use std::path::{Path, PathBuf};

use blackmamba::commands::logits::teacher_forced;
use blackmamba::loader::load_dir;
use blackmamba::model::config::Config;
use blackmamba::model::probe::Probe;
use blackmamba::model::random::{random_weights, RandomInit};
use blackmamba::model::state::State;
use blackmamba::model::{Logits, Model};
use blackmamba::runtime::decode::{DecodeOpts, Decoder};
use blackmamba::sampling::{argmax, Sampler, SamplingParams};
use blackmamba::sinkhorn::{SinkhornOpts, Variant};
use candle_core::{safetensors::load, DType, Device, Tensor, Var};
use common::{random_ids, tiny_config};

/// One test at a time on the GPU (the memory test reads device-wide free memory).
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The GPU (one test at a time), or None: skipped as every GPU test is (`gpu_common::device`).
fn gpu() -> Option<(std::sync::MutexGuard<'static, ()>, Device)> {
    let g = GPU.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Some((g, gpu_common::device()?))
}

fn on(cfg: &Config, seed: u64, dtype: DType, dev: &Device) -> Model {
    let w = random_weights(cfg, RandomInit { seed, perturb: true }, dtype, dev).unwrap();
    Model::from_tensors(cfg, w, dtype, dev).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| and max |b| over two same-sized host vectors.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let s = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(d.is_finite(), "non-finite difference");
    (d, s)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let (d, s) = diff(&host(a), &host(b));
    assert!(
        d <= rel * s.max(1e-3),
        "{what}: max |Δ| = {d} vs scale {s} (allowed {rel} relative)"
    );
}

fn states_close(what: &str, a: &State, b: &State, rel: f32) {
    for (x, y) in a.layers.iter().flatten().zip(b.layers.iter().flatten()) {
        assert_close(&format!("{what} conv"), &x.conv, &y.conv, rel);
        assert_close(&format!("{what} ssm"), &x.ssm, &y.ssm, rel);
    }
}

/// The golden fixture; `BM_FIXTURE_DIR` points elsewhere when the test binary runs away from
/// its source tree (the GPU machine).
fn fixture() -> PathBuf {
    std::env::var_os("BM_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a")).to_path_buf())
}

// Shapes: d = 64 takes the 16-byte vector loads everywhere; d = 18 (rows of 72 bytes in f32)
// takes the scalar loads in the products over d.
const SHAPES: [usize; 2] = [64, 18];

#[test]
fn fused_forward_matches_the_tensor_op_path_f32() {
    let Some((_gpu, dev)) = gpu() else { return };
    for d in SHAPES {
        let cfg = tiny_config(&["r", "8", "r", "8", "r"], d, 300);
        let mut m = on(&cfg, 1, DType::F32, &dev);
        for len in [1, 5, 70, 300] {
            let ids = Tensor::from_vec(random_ids(2 * len, 300, len as u64), (2, len), &dev).unwrap();
            let mut sf = m.new_state(2).unwrap();
            let mut pf = Probe::new();
            m.kernels.enabled = true;
            let fused = m.forward(&ids, &mut sf, Logits::All, Some(&mut pf)).unwrap();
            m.kernels.enabled = false;
            let mut ss = m.new_state(2).unwrap();
            let mut ps = Probe::new();
            let slow = m.forward(&ids, &mut ss, Logits::All, Some(&mut ps)).unwrap();
            assert_close(&format!("d={d} L={len} logits"), &fused, &slow, 1e-5);
            states_close(&format!("d={d} L={len}"), &sf, &ss, 1e-5);
            for (a, b) in pf.moe.iter().zip(&ps.moe) {
                assert_eq!(a.experts, b.experts, "d={d} L={len}: experts");
                let (dl, sl) = diff(&a.logits, &b.logits);
                assert!(dl <= 1e-5 * sl.max(1.0), "router logits differ by {dl}");
            }
            for (a, b) in pf.mamba.iter().zip(&ps.mamba) {
                for (x, y, what) in [
                    (&a.ssm_norm, &b.ssm_norm, "ssm"),
                    (&a.conv_norm, &b.conv_norm, "conv"),
                    (&a.mean_delta, &b.mean_delta, "delta"),
                ] {
                    let (dn, sn) = diff(x, y);
                    assert!(dn <= 1e-4 * sn.max(1e-3), "d={d} L={len}: {what} norms differ by {dn} (scale {sn})");
                }
            }
        }
    }
}

/// The MoE layer of the prefill with the experts' products batched (two cuBLAS calls, padded
/// groups) against the per-expert loop and the tensor-op twin, f32 and bf16; with a router bias
/// that sends almost every token to one expert, the padding would more than double the work and
/// the loop runs (same answer).
#[test]
fn batched_expert_products_match_the_per_expert_loop() {
    use blackmamba::model::fused::moe_forward;
    use blackmamba::model::moe::Routing;
    use blackmamba::model::Kernels;
    use blackmamba::model::Mixer;
    let Some((_gpu, dev)) = gpu() else { return };
    for (dtype, rel) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let cfg = tiny_config(&["r", "8"], 64, 300);
        let mut m = on(&cfg, 3, dtype, &dev);
        for (skew, tokens) in [(0.0, 512), (0.0, 77), (30.0, 512)] {
            let Mixer::Moe(moe) = &mut m.layers[1].mixer else {
                panic!("layer 1 is MoE")
            };
            if skew > 0.0 {
                let b = moe.router.bias.as_ref().unwrap();
                let mut v = vec![0f32; b.elem_count()];
                v[2] = skew;
                moe.router.bias = Some(Tensor::from_vec(v, b.dims(), &dev).unwrap().to_dtype(b.dtype()).unwrap());
            }
            let x = noise(tokens * 64, 9, 1.0, &dev).reshape((tokens, 64)).unwrap();
            let mut outs = Vec::new();
            for batched_experts in [true, false] {
                let k = Kernels {
                    batched_experts,
                    ..Kernels::default()
                };
                outs.push(moe_forward(moe, &x, Routing::Greedy, None, k).unwrap());
            }
            let twin = moe.forward(&x, Routing::Greedy, None).unwrap();
            let what = format!("{dtype:?} skew {skew} tokens {tokens}");
            assert_close(&format!("{what}: batched vs loop"), &outs[0], &outs[1], rel);
            assert_close(&format!("{what}: batched vs twin"), &outs[0], &twin, rel);
        }
    }
}

#[test]
fn fused_steps_after_a_prefill_match_the_tensor_op_path_f32() {
    let Some((_gpu, dev)) = gpu() else { return };
    for d in SHAPES {
        let cfg = tiny_config(&["r", "8", "r", "8"], d, 300);
        let mut m = on(&cfg, 2, DType::F32, &dev);
        let ids = random_ids(2 * 12, 300, 9);
        let head = Tensor::from_vec(ids[..14].to_vec(), (2, 7), &dev).unwrap();
        let mut run = |kernels: bool| {
            m.kernels.enabled = kernels;
            let mut st = m.new_state(2).unwrap();
            let mut p = Probe::new();
            let mut out = vec![m.forward(&head, &mut st, Logits::Last, Some(&mut p)).unwrap().squeeze(1).unwrap()];
            for t in 0..5 {
                let x = Tensor::from_vec(vec![ids[14 + t], ids[19 + t]], 2, &dev).unwrap();
                out.push(m.step(&x, &mut st, Some(&mut p)).unwrap());
            }
            (Tensor::stack(&out, 0).unwrap(), st, p)
        };
        let (lf, sf, pf) = run(true);
        let (ls, ss, ps) = run(false);
        assert_close(&format!("d={d} step logits"), &lf, &ls, 1e-5);
        states_close(&format!("d={d} after steps"), &sf, &ss, 1e-5);
        for (a, b) in pf.mamba.iter().zip(&ps.mamba) {
            let (dn, sn) = diff(&a.ssm_norm, &b.ssm_norm);
            assert!(dn <= 1e-4 * sn, "ssm norms differ by {dn}");
            let (dc, sc) = diff(&a.conv_norm, &b.conv_norm);
            assert!(dc <= 1e-4 * sc, "conv norms differ by {dc}");
        }
    }
}

/// bf16 on the fused path is as close to the f32 model as bf16 on the tensor-op path. Compared at
/// the positions where both bf16 runs route every token to the same experts as f32: a route flip
/// at a near tie (which bf16 rounding causes on either path, at different positions) moves the
/// logits by far more than rounding does and would decide the comparison by chance.
#[test]
fn fused_bf16_is_no_less_accurate_than_the_bf16_tensor_op_path() {
    let Some((_gpu, dev)) = gpu() else { return };
    let cfg = tiny_config(&["r", "8", "r", "8"], 64, 300);
    let reference = on(&cfg, 3, DType::F32, &dev);
    let mut m = on(&cfg, 3, DType::BF16, &dev);
    let n = 100;
    let ids = Tensor::from_vec(random_ids(n, 300, 4), (1, n), &dev).unwrap();
    let run = |model: &Model| {
        let mut p = Probe::new();
        let l = model
            .forward(&ids, &mut model.new_state(1).unwrap(), Logits::All, Some(&mut p))
            .unwrap();
        (l.squeeze(0).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(), p)
    };
    let (want, pw) = run(&reference);
    m.kernels.enabled = true;
    let (fused, pf) = run(&m);
    m.kernels.enabled = false;
    let (slow, ps) = run(&m);
    let same = |t: usize| {
        pw.moe
            .iter()
            .zip(&pf.moe)
            .zip(&ps.moe)
            .all(|((a, b), c)| a.experts[t] == b.experts[t] && a.experts[t] == c.experts[t])
    };
    let (mut ef, mut es, mut s, mut count) = (0f32, 0f32, 0f32, 0usize);
    let (mut top_f, mut top_s) = (0usize, 0usize);
    for t in 0..n {
        top_f += usize::from(argmax(&fused[t]) == argmax(&want[t]));
        top_s += usize::from(argmax(&slow[t]) == argmax(&want[t]));
        if same(t) {
            let (a, sc) = diff(&fused[t], &want[t]);
            let (b, _) = diff(&slow[t], &want[t]);
            ef = ef.max(a);
            es = es.max(b);
            s = s.max(sc);
            count += 1;
        }
    }
    assert!(
        count * 2 >= n,
        "only {count} of {n} positions route alike in f32 and both bf16 runs"
    );
    assert!(
        ef <= 1.5 * es + 1e-3 * s,
        "bf16 error on {count} same-route positions: fused {ef}, tensor-op {es} (scale {s})"
    );
    assert!(
        top_f + 2 >= top_s,
        "bf16 top-1 agreement with f32: fused {top_f}/{n}, tensor-op {top_s}/{n}"
    );
}

/// f32 on the fused path reproduces the reference fixture; bf16 on the fused path is at least as
/// close to it as bf16 on the tensor-op path (top-1 agreement and worst logit). The bf16 numbers
/// are printed, with the same numbers over the positions where every layer routes to the same
/// expert as in f32 (a route flip at a near tie moves logits by far more than rounding does).
#[test]
fn the_fixture_runs_fused_in_f32_as_the_reference_and_bf16_no_worse_than_the_tensor_op_path() {
    let Some((_gpu, dev)) = gpu() else { return };
    let exp = load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let f32m = load_dir(&fixture(), &dev, DType::F32).unwrap().0;
    let mut bf16m = load_dir(&fixture(), &dev, DType::BF16).unwrap().0;
    // per path: (agreeing, positions, worst |Δ|) overall and over same-route positions
    let mut all = [(0usize, 0usize, 0f32); 2];
    let mut same = [(0usize, 0usize, 0f32); 2];
    for k in 0..4 {
        let ids: Vec<u32> = exp[&format!("ids.{k}")]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let want = &exp[&format!("logits.{k}")];
        let w = want.to_vec2::<f32>().unwrap();
        for step in [false, true] {
            let (got, p32) = teacher_forced(&f32m, &ids, step).unwrap();
            let (d, _) = diff(&host(&got), &host(want));
            assert!(d < 1e-4, "prompt {k} step={step}: f32 fused max |Δ| = {d}");
            for (slot, kernels) in [(0, true), (1, false)] {
                bf16m.kernels.enabled = kernels;
                let (got, p16) = teacher_forced(&bf16m, &ids, step).unwrap();
                let g = got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                for (t, (a, b)) in g.iter().zip(&w).enumerate() {
                    let routes_agree = p32.moe.iter().zip(&p16.moe).all(|(x, y)| x.experts[t] == y.experts[t]);
                    let (dt, _) = diff(a, b);
                    for (st, on) in [(&mut all[slot], true), (&mut same[slot], routes_agree)] {
                        if on {
                            st.0 += usize::from(argmax(a) == argmax(b));
                            st.1 += 1;
                            st.2 = st.2.max(dt);
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "fixture bf16 vs reference: fused {}/{} top-1, max |Δ| {}; tensor-op {}/{}, max |Δ| {}; \
         same-route positions: fused {}/{}, max |Δ| {}; tensor-op {}/{}, max |Δ| {}",
        all[0].0, all[0].1, all[0].2, all[1].0, all[1].1, all[1].2, same[0].0, same[0].1, same[0].2, same[1].0, same[1].1, same[1].2
    );
    assert!(
        all[0].0 + 1 >= all[1].0,
        "fused bf16 agrees at {} positions, tensor-op at {}",
        all[0].0,
        all[1].0
    );
    assert!(
        all[0].2 <= 1.1 * all[1].2 + 1e-3,
        "fused bf16 worst {}, tensor-op {}",
        all[0].2,
        all[1].2
    );
}

#[test]
fn scan_kernel_matches_the_tensor_op_scan() {
    let Some((_gpu, dev)) = gpu() else { return };
    let (bn, di, n) = (2, 40, 16);
    for len in [1, 16, 100, 600] {
        let r = |shape: &[usize], lo: f64, hi: f64| Tensor::rand(lo as f32, hi as f32, shape, &dev).unwrap();
        let v = r(&[bn, len, di], -1.0, 1.0);
        let delta = r(&[bn, len, di], 0.001, 0.5);
        let a = r(&[di, n], -3.0, -0.05);
        let b = r(&[bn, len, n], -1.0, 1.0);
        let c = r(&[bn, len, n], -1.0, 1.0);
        let h0 = r(&[bn, di, n], -1.0, 1.0);
        let want = blackmamba::ops::scan::selective_scan(&v, &delta, &a, &b, &c, &h0, true).unwrap();
        let got = blackmamba::ops::scan_kernels::selective_scan(&v, &delta, &a, &b, &c, &h0, true).unwrap();
        assert_close(&format!("L={len} y"), &got.y, &want.y, 1e-5);
        assert_close(&format!("L={len} h_last"), &got.h_last, &want.h_last, 1e-5);
        assert_close(
            &format!("L={len} |h|"),
            got.h_norm.as_ref().unwrap(),
            want.h_norm.as_ref().unwrap(),
            1e-5,
        );
    }
}

#[test]
fn scan_backward_matches_autograd_and_finite_differences() {
    let Some((_gpu, dev)) = gpu() else { return };
    let (bn, len, di, n) = (2, 45, 24, 8);
    let r = |shape: &[usize], lo: f32, hi: f32| Tensor::rand(lo, hi, shape, &dev).unwrap();
    let v = Var::from_tensor(&r(&[bn, len, di], -1.0, 1.0)).unwrap();
    let delta = Var::from_tensor(&r(&[bn, len, di], 0.01, 0.5)).unwrap();
    let a = Var::from_tensor(&r(&[di, n], -2.0, -0.1)).unwrap();
    let b = Var::from_tensor(&r(&[bn, len, n], -1.0, 1.0)).unwrap();
    let c = Var::from_tensor(&r(&[bn, len, n], -1.0, 1.0)).unwrap();
    let w = r(&[bn, len, di], -1.0, 1.0);
    let h0 = Tensor::zeros((bn, di, n), DType::F32, &dev).unwrap();
    let loss_of = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
    let wh = host(&w);
    let ys = blackmamba::ops::scan::selective_scan(&v, &delta, &a, &b, &c, &h0, false).unwrap().y;
    let yk = blackmamba::ops::scan_grad::selective_scan_grad(&v, &delta, &a, &b, &c, None).unwrap();
    assert_close("forward", &yk, &ys, 1e-5);
    let gs = loss_of(&ys).backward().unwrap();
    let gk = loss_of(&yk).backward().unwrap();
    for (name, var) in [("v", &v), ("delta", &delta), ("a", &a), ("b", &b), ("c", &c)] {
        let want = gs.get(var.as_tensor()).unwrap();
        let got = gk.get(var.as_tensor()).unwrap();
        assert_close(&format!("d/d{name}"), got, want, 1e-4);
    }
    // central differences of the kernel's own forward, a few coordinates of Δ and A
    let base = |dl: &Tensor, aa: &Tensor| -> f64 {
        let y = host(&blackmamba::ops::scan_grad::selective_scan_grad(&v, dl, aa, &b, &c, None).unwrap());
        y.iter().zip(&wh).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum::<f64>()
    };
    let gd = host(gk.get(delta.as_tensor()).unwrap());
    let ga = host(gk.get(a.as_tensor()).unwrap());
    let eps = 1e-2f32;
    for idx in [0usize, 7, 500, 1999] {
        let mut d0 = host(&delta);
        d0[idx] += eps;
        let up = base(&Tensor::from_vec(d0.clone(), delta.dims(), &dev).unwrap(), &a);
        d0[idx] -= 2.0 * eps;
        let dn = base(&Tensor::from_vec(d0, delta.dims(), &dev).unwrap(), &a);
        let fd = (up - dn) / (2.0 * f64::from(eps));
        let g = f64::from(gd[idx]);
        assert!(
            (fd - g).abs() <= 2e-2 * g.abs().max(0.1),
            "dΔ[{idx}]: autograd {g}, finite difference {fd}"
        );
    }
    for idx in [0usize, 33, 191] {
        let mut a0 = host(&a);
        a0[idx] += eps;
        let up = base(&delta, &Tensor::from_vec(a0.clone(), a.dims(), &dev).unwrap());
        a0[idx] -= 2.0 * eps;
        let dn = base(&delta, &Tensor::from_vec(a0, a.dims(), &dev).unwrap());
        let fd = (up - dn) / (2.0 * f64::from(eps));
        let g = f64::from(ga[idx]);
        assert!(
            (fd - g).abs() <= 2e-2 * g.abs().max(0.1),
            "dA[{idx}]: autograd {g}, finite difference {fd}"
        );
    }
}

#[test]
fn device_sinkhorn_matches_the_host_one() {
    let Some((_gpu, dev)) = gpu() else { return };
    for (t, e, scale) in [(300usize, 8usize, 1.0f32), (5, 8, 3.0), (2048, 8, 0.1)] {
        let cost = (Tensor::randn(0f32, 1.0, (t, e), &dev).unwrap() * f64::from(scale)).unwrap();
        let host_cost = host(&cost);
        for variant in [Variant::Zyphra, Variant::Standard] {
            let opts = SinkhornOpts {
                variant,
                max_iters: 200,
                tol: 1e-4,
            };
            let want = blackmamba::sinkhorn::sinkhorn(&host_cost, t, e, &opts);
            let got = blackmamba::ops::sinkhorn::sinkhorn(&cost, &opts).unwrap();
            assert_eq!(got.trace.len(), want.trace.len(), "{t}x{e} {variant:?}: passes");
            assert_eq!(got.converged, want.converged);
            assert_eq!(got.assignment, want.assignment, "{t}x{e} {variant:?}: assignment");
            for (x, y) in got.trace.iter().zip(&want.trace) {
                // f64 sums in another order: differences of near-equal numbers (the marginal
                // errors, the change of d1) carry an absolute error of a few ulps of their operands
                let d1_scale = y.abs_change / y.rel_change.max(f64::MIN_POSITIVE);
                let checks = [
                    ("abs_change", x.abs_change, y.abs_change, 1e-12 * d1_scale),
                    ("rel_change", x.rel_change, y.rel_change, 1e-12),
                    ("row_err", x.row_err, y.row_err, 1e-10),
                    ("col_err", x.col_err, y.col_err, 1e-10),
                ];
                for (what, p, q, abs) in checks {
                    assert!((p - q).abs() <= 1e-9 * q.abs() + abs, "{t}x{e} {variant:?}: {what} {p} vs {q}");
                }
            }
            let (d, s) = diff(&got.plan, &want.plan);
            assert!(d <= 1e-6 * s, "{t}x{e} {variant:?}: plan differs by {d}");
        }
    }
}

/// Teacher-forces `ids[1..]` through a decoder started from the state after `ids[0]`, returning
/// the logits of every position (the decoder's own logits buffer).
fn decoder_logits(m: &Model, ids: &[u32], opts: DecodeOpts, graph: bool) -> Vec<Vec<f32>> {
    let dev = &m.device;
    let mut st = m.new_state(1).unwrap();
    let first = m
        .forward(&Tensor::from_slice(&ids[..1], (1, 1), dev).unwrap(), &mut st, Logits::Last, None)
        .unwrap();
    let mut dec = Decoder::new(m, opts).unwrap();
    dec.load_state(&st).unwrap();
    if graph {
        dec.capture().unwrap();
    }
    let mut out = vec![host(&first)];
    for &id in &ids[1..] {
        dec.set_token(id).unwrap();
        dec.step().unwrap();
        out.push(dec.logits().unwrap());
    }
    out
}

#[test]
fn decoder_reproduces_the_fixture_in_f32_eager_and_as_a_graph() {
    let Some((_gpu, dev)) = gpu() else { return };
    let exp = load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap();
    let m = load_dir(&fixture(), &dev, DType::F32).unwrap().0;
    for k in 0..4 {
        let ids: Vec<u32> = exp[&format!("ids.{k}")]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let want = exp[&format!("logits.{k}")].to_vec2::<f32>().unwrap();
        for (graph, split_k, pdl) in [(false, 1, true), (true, 1, true), (true, 3, true), (true, 2, false)] {
            let opts = DecodeOpts {
                split_k,
                pdl,
                ..Default::default()
            };
            let got = decoder_logits(&m, &ids, opts, graph);
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                let (d, _) = diff(g, w);
                assert!(
                    d < 1e-4,
                    "prompt {k} pos {t} graph={graph} split={split_k} pdl={pdl}: max |Δ| = {d}"
                );
            }
        }
    }
}

#[test]
fn decoder_greedy_tokens_state_and_probe_match_model_step() {
    let Some((_gpu, dev)) = gpu() else { return };
    for d in SHAPES {
        let cfg = tiny_config(&["r", "8", "r", "8"], d, 300);
        let mut m = on(&cfg, 5, DType::F32, &dev);
        m.kernels.enabled = false;
        let prompt = Tensor::from_vec(random_ids(9, 300, 6), (1, 9), &dev).unwrap();
        let mut st = m.new_state(1).unwrap();
        let l = m.forward(&prompt, &mut st, Logits::Last, None).unwrap();
        let first = argmax(&host(&l));
        let mut dec = Decoder::new(
            &m,
            DecodeOpts {
                probe: true,
                ..Default::default()
            },
        )
        .unwrap();
        dec.load_state(&st).unwrap();
        dec.set_token(first).unwrap();
        dec.capture().unwrap();
        let (mut id, mut pd, mut ps) = (first, Probe::new(), Probe::new());
        for t in 0..20 {
            let tok = dec.step().unwrap();
            dec.record_probe(0, &mut pd).unwrap();
            let l = m.step(&Tensor::new(&[id], &dev).unwrap(), &mut st, Some(&mut ps)).unwrap();
            let hl = host(&l);
            let (dl, sl) = diff(&dec.logits().unwrap(), &hl);
            assert!(dl <= 1e-5 * sl, "d={d} step {t}: logits differ by {dl}");
            id = argmax(&hl);
            assert_eq!(tok, id, "d={d} step {t}: greedy token");
        }
        states_close(&format!("d={d} decoder state"), &dec.state(&m, st.pos).unwrap(), &st, 1e-5);
        for (a, b) in pd.moe.iter().zip(&ps.moe) {
            assert_eq!(a.experts, b.experts, "d={d}: routes");
            let (dl, sl) = diff(&a.logits, &b.logits);
            assert!(dl <= 1e-5 * sl.max(1.0), "d={d}: router logits differ by {dl}");
        }
        for (a, b) in pd.mamba.iter().zip(&ps.mamba) {
            for (x, y) in [
                (&a.ssm_norm, &b.ssm_norm),
                (&a.conv_norm, &b.conv_norm),
                (&a.mean_delta, &b.mean_delta),
            ] {
                let (dn, sn) = diff(x, y);
                assert!(dn <= 1e-4 * sn, "d={d}: telemetry differs by {dn} (scale {sn})");
            }
        }
    }
}

#[test]
fn decoder_bf16_is_no_less_accurate_than_bf16_model_step() {
    let Some((_gpu, dev)) = gpu() else { return };
    let cfg = tiny_config(&["r", "8", "r", "8"], 64, 300);
    let reference = on(&cfg, 7, DType::F32, &dev);
    let mut m = on(&cfg, 7, DType::BF16, &dev);
    m.kernels.enabled = false;
    let ids = random_ids(40, 300, 8);
    let want = teacher_forced(&reference, &ids, true).unwrap().0.to_vec2::<f32>().unwrap();
    let slow = teacher_forced(&m, &ids, true)
        .unwrap()
        .0
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    {
        let got = decoder_logits(&m, &ids, DecodeOpts::default(), true);
        let (mut ef, mut es, mut s) = (0f32, 0f32, 0f32);
        for t in 0..ids.len() {
            let (a, sc) = diff(&got[t], &want[t]);
            let (b, _) = diff(&slow[t], &want[t]);
            ef = ef.max(a);
            es = es.max(b);
            s = s.max(sc);
        }
        assert!(
            ef <= 1.5 * es + 1e-3 * s,
            "bf16 decode error: fused {ef}, tensor-op {es} (scale {s})"
        );
    }
}

/// Host sampler settings the device sampler is checked under: the defaults, greedy with and
/// without a penalty, hot and cold temperatures, tight and loose filters, the largest top-k.
fn sampling_cases() -> Vec<SamplingParams> {
    let d = SamplingParams::default();
    vec![
        d.clone(),
        SamplingParams {
            temperature: 0.0,
            ..d.clone()
        },
        SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..d.clone()
        },
        SamplingParams {
            temperature: 1.5,
            top_k: 1024,
            top_p: 1.0,
            min_p: 0.0,
            ..d.clone()
        },
        SamplingParams {
            temperature: 0.3,
            top_k: 7,
            top_p: 0.5,
            min_p: 0.2,
            repeat_penalty: 1.8,
            repeat_last_n: 200,
            ..d.clone()
        },
        SamplingParams { top_k: 1, ..d },
    ]
}

/// The device sampler against the host sampler on the same logits, settings, history and
/// generator: the same token at every draw and the same generator state after.
#[test]
fn device_sampler_draws_what_the_host_sampler_draws() {
    use blackmamba::ops::sample::DeviceSampler;
    let Some((_gpu, dev)) = gpu() else { return };
    for (case, p) in sampling_cases().into_iter().enumerate() {
        for vocab in [50_304usize, 300] {
            let mut host = Sampler::new(p.clone());
            let ds = DeviceSampler::new(&dev).unwrap();
            let mut history: Vec<u32> = random_ids(40, vocab.min(300), case as u64);
            ds.reset(&p, host.rng_state(), &history).unwrap();
            for draw in 0..120u64 {
                let l = distinct_logits(vocab, 1000 * case as u64 + draw, &dev);
                let fed = (draw as u32 * 7919) % vocab as u32;
                history.push(fed);
                let want = host.sample(&host_logits(&l), &history);
                let got = ds.sample(&l, fed).unwrap();
                assert_eq!(
                    got, want,
                    "case {case} vocab {vocab} draw {draw}: device {got}, host {want} ({p:?})"
                );
            }
            let st = ds.state().unwrap();
            assert_eq!(st.rng, host.rng_state(), "case {case} vocab {vocab}: generator state");
        }
    }
}

fn host_logits(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// Logits in [-3, 3) with no two equal (a shuffled ramp): ties at a filter's boundary are where
/// the host's unstable selection and the device's lowest-index rule may part (docs/decode.md).
fn distinct_logits(vocab: usize, seed: u64, dev: &Device) -> Tensor {
    let mut v: Vec<f32> = (0..vocab).map(|k| (k as f32 - vocab as f32 / 2.0) * (6.0 / vocab as f32)).collect();
    let mut r = blackmamba::rng::Rng::new(seed);
    for i in (1..vocab).rev() {
        v.swap(i, r.below(i + 1));
    }
    Tensor::from_vec(v, vocab, dev).unwrap()
}

/// The decoder with the device sampler against `Model::step` and the host sampler: the same
/// tokens, step by step, under the default settings and a greedy one with a penalty.
#[test]
fn decoder_sampling_on_the_device_matches_model_step_with_host_sampling() {
    let Some((_gpu, dev)) = gpu() else { return };
    let cfg = tiny_config(&["r", "8", "r", "8"], 64, 300);
    let mut m = on(&cfg, 21, DType::F32, &dev);
    m.kernels.enabled = false;
    for p in [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.3,
            ..SamplingParams::default()
        },
    ] {
        let prompt = random_ids(12, 300, 5);
        let mut st = m.new_state(1).unwrap();
        let l = m
            .forward(&Tensor::from_slice(&prompt, (1, 12), &dev).unwrap(), &mut st, Logits::Last, None)
            .unwrap();
        let mut hs = Sampler::new(p.clone());
        let mut history = prompt.clone();
        let first = hs.sample(&host(&l), &history);
        let mut dec = Decoder::new(
            &m,
            DecodeOpts {
                sampler: true,
                ..Default::default()
            },
        )
        .unwrap();
        dec.load_state(&st).unwrap();
        dec.set_sampling(&p, hs.rng_state(), &history).unwrap();
        dec.set_token(first).unwrap();
        dec.capture().unwrap();
        let mut id = first;
        for t in 0..60 {
            history.push(id);
            let got = dec.step().unwrap();
            let l = m.step(&Tensor::new(&[id], &dev).unwrap(), &mut st, None).unwrap();
            let want = hs.sample(&host(&l), &history);
            assert_eq!(got, want, "step {t}: device {got}, host {want} ({p:?})");
            id = want;
        }
    }
}

/// Over many draws from one state, the device sampler follows softmax(logits / T) (no filter).
#[test]
fn device_sampling_follows_softmax_of_logits_over_temperature() {
    let Some((_gpu, dev)) = gpu() else { return };
    let cfg = tiny_config(&["r", "8"], 64, 16);
    let m = on(&cfg, 11, DType::F32, &dev);
    let mut st = m.new_state(1).unwrap();
    m.forward(
        &Tensor::from_vec(vec![3u32, 5, 7], (1, 3), &dev).unwrap(),
        &mut st,
        Logits::Last,
        None,
    )
    .unwrap();
    let temp = 1.5f64;
    let p = SamplingParams {
        temperature: temp,
        top_k: 16,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        seed: 1234,
        ..SamplingParams::default()
    };
    let mut dec = Decoder::new(
        &m,
        DecodeOpts {
            sampler: true,
            ..Default::default()
        },
    )
    .unwrap();
    let n = 4000;
    let mut counts = [0usize; 16];
    let mut rng = blackmamba::rng::Rng::new(p.seed);
    for _ in 0..n {
        dec.load_state(&st).unwrap();
        dec.set_sampling(&p, rng.state(), &[]).unwrap();
        rng.next_u64();
        dec.set_token(9).unwrap();
        counts[dec.step().unwrap() as usize] += 1;
    }
    let logits = dec.logits().unwrap();
    let mx = logits.iter().copied().fold(f32::MIN, f32::max);
    let w: Vec<f64> = logits.iter().map(|&l| (f64::from(l - mx) / temp).exp()).collect();
    let z: f64 = w.iter().sum();
    for (i, &c) in counts.iter().enumerate() {
        let q = w[i] / z;
        let sd = (n as f64 * q * (1.0 - q)).sqrt();
        let dev_ = (c as f64 - n as f64 * q).abs();
        assert!(
            dev_ <= 5.0 * sd + 2.0,
            "token {i}: {c} draws, expected {:.1} ± {sd:.1}",
            n as f64 * q
        );
    }
    assert!(
        counts.iter().filter(|&&c| c > 0).count() >= 2,
        "sampling always picked the same token"
    );
}

#[test]
fn decoder_memory_stays_flat_and_graph_equals_eager() {
    let Some((_gpu, dev)) = gpu() else { return };
    let cfg = tiny_config(&["r", "8", "r", "8"], 64, 300);
    let m = on(&cfg, 13, DType::BF16, &dev);
    let mut st = m.new_state(1).unwrap();
    m.forward(
        &Tensor::from_vec(random_ids(5, 300, 1), (1, 5), &dev).unwrap(),
        &mut st,
        Logits::Last,
        None,
    )
    .unwrap();
    let run = |graph: bool| -> Vec<u32> {
        let mut dec = Decoder::new(&m, DecodeOpts::default()).unwrap();
        dec.load_state(&st).unwrap();
        dec.set_token(17).unwrap();
        if graph {
            dec.capture().unwrap();
        }
        let cd = blackmamba::ops::cuda::cuda_device(&dev).unwrap();
        let (free0, _) = blackmamba::ops::cuda::mem_info(cd).unwrap();
        let toks: Vec<u32> = (0..500).map(|_| dec.step().unwrap()).collect();
        let (free1, _) = blackmamba::ops::cuda::mem_info(cd).unwrap();
        assert_eq!(free0, free1, "device memory changed while decoding (graph={graph})");
        toks
    };
    assert_eq!(run(false), run(true), "eager and graph decode differ");
}

#[test]
fn fused_path_respects_shapes_it_cannot_take() {
    // state size 32 is over the scan kernel's 16: the fused model falls back where it must
    let Some((_gpu, dev)) = gpu() else { return };
    let json = serde_json::json!({
        "num_layers": 2, "hidden_size": 32, "state_size": 32, "conv_dimension": 4,
        "vocab_size": 100, "expansion_factor": 2, "mamba_moe_layers": ["r", "8"],
        "ffn_hidden_size": 16, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 64
    });
    let cfg = Config::from_json_str(&json.to_string()).unwrap();
    let mut m = on(&cfg, 3, DType::F32, &dev);
    let ids = Tensor::from_vec(random_ids(20, 100, 2), (1, 20), &dev).unwrap();
    let fused = m.forward(&ids, &mut m.new_state(1).unwrap(), Logits::All, None).unwrap();
    m.kernels.enabled = false;
    let slow = m.forward(&ids, &mut m.new_state(1).unwrap(), Logits::All, None).unwrap();
    assert_close("N=32 fallback", &fused, &slow, 1e-5);
}

/// Random values of a simple generator (the same on every run), as an f32 tensor on `dev`.
fn noise(n: usize, seed: u64, scale: f32, dev: &Device) -> Tensor {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect();
    Tensor::from_vec(v, n, dev).unwrap()
}

/// The fused AdamW step (in place) and the fused gradient norm equal their tensor-op twins over
/// three steps, with and without weight decay and with clipping.
#[test]
fn fused_adamw_and_gradient_norm_match_the_tensor_op_optimiser() {
    use blackmamba::finetune::optim::{global_norm, global_norm_ops, AdamW, AdamWParams, Param};
    let Some((_gpu, dev)) = gpu() else { return };
    let sizes = [(185usize, true), (1000, false), (4480, true)];
    let params = |tag: &str| -> Vec<Param> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(n, decay))| Param {
                name: format!("{tag}.{i}"),
                var: Var::from_tensor(&noise(n, 7 + i as u64, 2.0, &dev)).unwrap(),
                decay,
            })
            .collect()
    };
    let (pa, pb) = (params("fused"), params("ops"));
    let hp = AdamWParams {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (mut a, mut b) = (AdamW::new(&pa, hp).unwrap(), AdamW::new(&pb, hp).unwrap());
    // the model's bf16 copies, rewritten by the fused step (checked against a fresh cast)
    let casts: Vec<Option<Tensor>> = pa.iter().map(|p| Some(p.var.as_tensor().to_dtype(DType::BF16).unwrap())).collect();
    for step in 0..3u64 {
        let grads: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(n, _))| noise(n, 100 * step + i as u64, 0.3, &dev))
            .collect();
        let (nf, no) = (global_norm(&grads, true).unwrap(), global_norm_ops(&grads).unwrap());
        assert!((nf - no).abs() <= 1e-6 * no, "step {step}: gradient norm {nf} vs {no}");
        let (lr, scale) = (1e-2 * (step + 1) as f64, if step == 1 { 0.5 } else { 1.0 });
        a.t += 1;
        a.step_fused(&pa, &grads, lr, scale, &casts).unwrap();
        b.t += 1;
        b.step_ops(&pb, &grads, lr, scale).unwrap();
        for (k, (x, y)) in pa.iter().zip(&pb).enumerate() {
            assert_close(&format!("step {step} weight {k}"), x.var.as_tensor(), y.var.as_tensor(), 1e-6);
            assert_close(&format!("step {step} m {k}"), &a.moments[k].0, &b.moments[k].0, 1e-6);
            assert_close(&format!("step {step} v {k}"), &a.moments[k].1, &b.moments[k].1, 1e-6);
            let fresh = host(&x.var.as_tensor().to_dtype(DType::BF16).unwrap());
            let written = casts[k].as_ref().map(host).unwrap();
            assert_eq!(
                written, fresh,
                "step {step} weight {k}: the bf16 copy is not the updated weight's cast"
            );
        }
    }
    let moved = diff(&host(pa[0].var.as_tensor()), &host(&noise(sizes[0].0, 7, 2.0, &dev))).0;
    assert!(moved > 1e-3, "the weights did not move ({moved})");
}
