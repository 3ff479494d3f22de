//! The Mamba mixer's fused training ops (`ops::mamba_grad`) against their slow twin, the tensor-op
//! path autograd differentiates: outputs, final states and the gradient of every input and
//! parameter, f32, plus central differences of a few scalar gradients. Runs only in a
//! `--features cuda` build on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
mod gpu_common;

use blackmamba::model::linear::softplus;
use blackmamba::model::mamba::MambaMixer;
use blackmamba::model::random::{random_weights, RandomInit};
use blackmamba::model::state::LayerState;
use blackmamba::model::{Mixer, Model};
use blackmamba::ops::mamba_grad::{conv_silu, scan_tail, TailIn};
use blackmamba::ops::scan::selective_scan;
use candle_core::{DType, Device, Tensor, Var};
use common::tiny_config;

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks max |a − b| <= rel · max |b| (floored at 1e-3), printing every comparison (run with
/// --nocapture to see them all); failures are collected and reported by [`Checks::done`].
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn close(&mut self, what: &str, a: &Tensor, b: &Tensor, rel: f32) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (host(a), host(b));
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let s = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let ok = d.is_finite() && d <= rel * s.max(1e-3);
        eprintln!(
            "{} {what}: max |Δ| = {d:.3e}, scale {s:.3e}, rel {:.3e} (allowed {rel:.0e})",
            if ok { "ok " } else { "BAD" },
            d / s.max(1e-3)
        );
        if !ok {
            self.0.push(format!("{what}: max |Δ| = {d} vs scale {s} (allowed {rel} relative)"));
        }
    }

    fn done(self) {
        assert!(self.0.is_empty(), "{} comparisons failed:\n{}", self.0.len(), self.0.join("\n"));
    }
}

fn rand(shape: &[usize], lo: f32, hi: f32, dev: &Device) -> Tensor {
    Tensor::rand(lo, hi, shape, dev).unwrap()
}

fn var(shape: &[usize], lo: f32, hi: f32, dev: &Device) -> Var {
    Var::from_tensor(&rand(shape, lo, hi, dev)).unwrap()
}

/// The twin of `conv_silu`: the tensor-op conv of `MambaMixer::forward`.
fn conv_twin(u: &Tensor, w: &Tensor, b: &Tensor, st: &Tensor) -> (Tensor, Tensor) {
    let (len, k) = (u.dim(1).unwrap(), w.dim(2).unwrap());
    let prev = st.narrow(2, 1, k - 1).unwrap().transpose(1, 2).unwrap();
    let u_ext = Tensor::cat(&[&prev, u], 1).unwrap();
    let w2 = w.squeeze(1).unwrap();
    let mut c = b.unsqueeze(0).unwrap().unsqueeze(0).unwrap();
    for tap in 0..k {
        let wt = w2.narrow(1, tap, 1).unwrap().squeeze(1).unwrap();
        c = u_ext
            .narrow(1, tap, len)
            .unwrap()
            .broadcast_mul(&wt)
            .unwrap()
            .broadcast_add(&c)
            .unwrap();
    }
    let new = u_ext.narrow(1, len - 1, k).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    (candle_nn::ops::silu(&c).unwrap(), new)
}

/// The twin of `scan_tail`: softplus, the tensor-op scan, D skip and gate.
fn tail_twin(x: &TailIn) -> (Tensor, Tensor) {
    let delta = softplus(&x.dt.broadcast_add(x.dt_bias).unwrap()).unwrap();
    let a = x.a_log.exp().unwrap().neg().unwrap();
    let s = selective_scan(x.v, &delta, &a, x.b, x.c, x.h0, false).unwrap();
    let y = (s.y + x.v.broadcast_mul(x.d).unwrap()).unwrap();
    ((y * candle_nn::ops::silu(x.z).unwrap()).unwrap(), s.h_last)
}

#[test]
fn conv_silu_matches_the_tensor_op_conv_with_gradients() {
    let Some(dev) = gpu_common::device() else { return };
    let (bn, di, k) = (2, 40, 4);
    let mut ck = Checks::default();
    for len in [1, 3, 45, 130] {
        let u = var(&[bn, len, di], -1.0, 1.0, &dev);
        let w = var(&[di, 1, k], -0.8, 0.8, &dev);
        let b = var(&[di], -0.5, 0.5, &dev);
        let st = rand(&[bn, di, k], -1.0, 1.0, &dev);
        let g = rand(&[bn, len, di], -1.0, 1.0, &dev);
        let (vk, sk) = conv_silu(&u, &w, &b, &st).unwrap();
        let (vt, stw) = conv_twin(&u, &w, &b, &st);
        ck.close(&format!("L={len} v"), &vk, &vt, 1e-5);
        ck.close(&format!("L={len} state"), &sk, &stw, 0.0);
        let gk = (vk * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (vt * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("u", &u), ("w", &w), ("b", &b)] {
            let got = gk.get(x.as_tensor()).unwrap();
            let want = gt.get(x.as_tensor()).unwrap();
            ck.close(&format!("L={len} d/d{name}"), got, want, 1e-4);
        }
    }
    ck.done();
}

#[test]
fn scan_tail_matches_the_tensor_op_path_with_gradients() {
    let Some(dev) = gpu_common::device() else { return };
    let (bn, di, n) = (2, 40, 8);
    let mut ck = Checks::default();
    for len in [1, 16, 45, 600] {
        let v = var(&[bn, len, di], -1.0, 1.0, &dev);
        let dt = var(&[bn, len, di], -4.0, 1.0, &dev);
        let z = var(&[bn, len, di], -2.0, 2.0, &dev);
        let b = var(&[bn, len, n], -1.0, 1.0, &dev);
        let c = var(&[bn, len, n], -1.0, 1.0, &dev);
        let a_log = var(&[di, n], -1.0, 1.5, &dev);
        let d = var(&[di], -1.0, 1.0, &dev);
        let dt_bias = var(&[di], -2.0, 0.5, &dev);
        let h0 = rand(&[bn, di, n], -1.0, 1.0, &dev);
        let g = rand(&[bn, len, di], -1.0, 1.0, &dev);
        let x = TailIn {
            v: &v,
            dt: &dt,
            z: &z,
            b: &b,
            c: &c,
            a_log: &a_log,
            d: &d,
            dt_bias: &dt_bias,
            h0: &h0,
        };
        let (ok, hk) = scan_tail(&x).unwrap();
        let (ot, ht) = tail_twin(&x);
        ck.close(&format!("L={len} out"), &ok, &ot, 1e-5);
        ck.close(&format!("L={len} h_last"), &hk, &ht, 1e-5);
        let gk = (ok * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (ot * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let all = [
            ("v", &v),
            ("dt", &dt),
            ("z", &z),
            ("B", &b),
            ("C", &c),
            ("A_log", &a_log),
            ("D", &d),
            ("dt_bias", &dt_bias),
        ];
        for (name, p) in all {
            let got = gk.get(p.as_tensor()).unwrap();
            let want = gt.get(p.as_tensor()).unwrap();
            ck.close(&format!("L={len} d/d{name}"), got, want, 1e-4);
        }
    }
    ck.done();
}

#[test]
fn scan_tail_and_conv_gradients_match_central_differences() {
    let Some(dev) = gpu_common::device() else { return };
    let (bn, len, di, n) = (2, 37, 16, 8);
    let v = rand(&[bn, len, di], -1.0, 1.0, &dev);
    let dt = rand(&[bn, len, di], -3.0, 0.5, &dev);
    let z = rand(&[bn, len, di], -2.0, 2.0, &dev);
    let b = rand(&[bn, len, n], -1.0, 1.0, &dev);
    let c = rand(&[bn, len, n], -1.0, 1.0, &dev);
    let a_log = var(&[di, n], -1.0, 1.0, &dev);
    let d = rand(&[di], -1.0, 1.0, &dev);
    let dt_bias = var(&[di], -1.5, 0.5, &dev);
    let h0 = Tensor::zeros((bn, di, n), DType::F32, &dev).unwrap();
    let g = rand(&[bn, len, di], -1.0, 1.0, &dev);
    let gh = host(&g);
    let loss = |al: &Tensor, bias: &Tensor| -> f64 {
        let x = TailIn {
            v: &v,
            dt: &dt,
            z: &z,
            b: &b,
            c: &c,
            a_log: al,
            d: &d,
            dt_bias: bias,
            h0: &h0,
        };
        let out = host(&scan_tail(&x).unwrap().0);
        out.iter().zip(&gh).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum()
    };
    let x = TailIn {
        v: &v,
        dt: &dt,
        z: &z,
        b: &b,
        c: &c,
        a_log: &a_log,
        d: &d,
        dt_bias: &dt_bias,
        h0: &h0,
    };
    let grads = (scan_tail(&x).unwrap().0 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-2f32;
    let check = |name: &str, p: &Var, idx: usize, f: &dyn Fn(&Tensor) -> f64| {
        let gk = f64::from(host(grads.get(p.as_tensor()).unwrap())[idx]);
        let mut x0 = host(p);
        x0[idx] += eps;
        let up = f(&Tensor::from_vec(x0.clone(), p.dims(), &dev).unwrap());
        x0[idx] -= 2.0 * eps;
        let dn = f(&Tensor::from_vec(x0, p.dims(), &dev).unwrap());
        let fd = (up - dn) / (2.0 * f64::from(eps));
        fd_verdict(&format!("{name}[{idx}]"), gk, fd)
    };
    let mut fails = Vec::new();
    for idx in [0, 5, 100] {
        fails.extend(check("A_log", &a_log, idx, &|t| loss(t, &dt_bias)));
    }
    for idx in [0, 9] {
        fails.extend(check("dt_bias", &dt_bias, idx, &|t| loss(&a_log, t)));
    }
    // the conv's weight
    let u = rand(&[bn, len, di], -1.0, 1.0, &dev);
    let w = var(&[di, 1, 4], -0.8, 0.8, &dev);
    let cb = rand(&[di], -0.5, 0.5, &dev);
    let st = Tensor::zeros((bn, di, 4), DType::F32, &dev).unwrap();
    let closs = |w: &Tensor| -> f64 {
        let v = host(&conv_silu(&u, w, &cb, &st).unwrap().0);
        v.iter().zip(&gh).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum()
    };
    let cg = (conv_silu(&u, &w, &cb, &st).unwrap().0 * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for idx in [0usize, 3, 41] {
        let gk = f64::from(host(cg.get(w.as_tensor()).unwrap())[idx]);
        let mut x0 = host(&w);
        x0[idx] += eps;
        let up = closs(&Tensor::from_vec(x0.clone(), w.dims(), &dev).unwrap());
        x0[idx] -= 2.0 * eps;
        let dn = closs(&Tensor::from_vec(x0, w.dims(), &dev).unwrap());
        let fd = (up - dn) / (2.0 * f64::from(eps));
        fails.extend(fd_verdict(&format!("conv w[{idx}]"), gk, fd));
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// The op's gradient against a central difference (step 1e-2: agreement to 2% or 0.002).
fn fd_verdict(what: &str, op: f64, fd: f64) -> Option<String> {
    let ok = (fd - op).abs() <= 2e-2 * op.abs().max(0.1);
    eprintln!("{} {what}: op {op:.6e}, finite difference {fd:.6e}", if ok { "ok " } else { "BAD" });
    (!ok).then(|| format!("{what}: op {op}, finite difference {fd}"))
}

/// Layer 0 of a tiny random f32 model on the GPU, every tensor made a variable (named).
fn mixer_with_vars(dev: &Device) -> (MambaMixer, Vec<(String, Var)>) {
    let cfg = tiny_config(&["r"], 32, 64);
    let w = random_weights(&cfg, RandomInit { seed: 7, perturb: true }, DType::F32, dev).unwrap();
    let model = Model::from_tensors(&cfg, w, DType::F32, dev).unwrap();
    let Mixer::Mamba(m) = &model.layers[0].mixer else {
        panic!("layer 0 is not a Mamba layer")
    };
    let mut m = m.clone();
    let mut vars = Vec::new();
    m.visit_mut(&mut |name, t| {
        let v = Var::from_tensor(t)?;
        *t = v.as_tensor().clone();
        vars.push((name.to_string(), v));
        Ok(())
    })
    .unwrap();
    (m, vars)
}

#[test]
fn fused_mixer_forward_matches_the_tensor_op_mixer_with_every_gradient() {
    let Some(dev) = gpu_common::device() else { return };
    let (m, vars) = mixer_with_vars(&dev);
    let (bn, di, k, n) = (2, m.d_inner, m.d_conv, m.d_state);
    let mut ck = Checks::default();
    for (len, zero_state) in [(45, true), (100, false), (5, false)] {
        let x = var(&[bn, len, 32], -1.0, 1.0, &dev);
        let g = rand(&[bn, len, 32], -1.0, 1.0, &dev);
        let st = if zero_state {
            LayerState {
                conv: Tensor::zeros((bn, di, k), DType::F32, &dev).unwrap(),
                ssm: Tensor::zeros((bn, di, n), DType::F32, &dev).unwrap(),
            }
        } else {
            LayerState {
                conv: rand(&[bn, di, k], -1.0, 1.0, &dev),
                ssm: rand(&[bn, di, n], -1.0, 1.0, &dev),
            }
        };
        let (mut sk, mut st_twin) = (st.clone(), st);
        let ok = blackmamba::model::fused::mamba_train::mixer_forward(&m, &x, &mut sk)
            .unwrap()
            .unwrap();
        let ot = m
            .forward(&x, &mut st_twin, None, blackmamba::ops::scan_train::FusedScan::Off)
            .unwrap();
        ck.close(&format!("L={len} out"), &ok, &ot, 1e-5);
        ck.close(&format!("L={len} conv state"), &sk.conv, &st_twin.conv, 0.0);
        ck.close(&format!("L={len} ssm state"), &sk.ssm, &st_twin.ssm, 1e-5);
        let gk = (ok * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (ot * &g).unwrap().sum_all().unwrap().backward().unwrap();
        ck.close(
            &format!("L={len} d/dx"),
            gk.get(x.as_tensor()).unwrap(),
            gt.get(x.as_tensor()).unwrap(),
            1e-4,
        );
        for (name, p) in &vars {
            let want = gt.get(p.as_tensor()).unwrap_or_else(|| panic!("twin has no gradient for {name}"));
            let got = gk
                .get(p.as_tensor())
                .unwrap_or_else(|| panic!("fused path has no gradient for {name}"));
            ck.close(&format!("L={len} d/d{name}"), got, want, 1e-4);
        }
    }
    ck.done();
}

#[test]
fn shapes_past_the_kernels_fall_back_to_the_tensor_op_path() {
    let Some(dev) = gpu_common::device() else { return };
    let (mut m, _) = mixer_with_vars(&dev);
    m.d_conv = 9;
    let mut st = LayerState {
        conv: Tensor::zeros((1, m.d_inner, 9), DType::F32, &dev).unwrap(),
        ssm: Tensor::zeros((1, m.d_inner, m.d_state), DType::F32, &dev).unwrap(),
    };
    let x = rand(&[1, 4, 32], -1.0, 1.0, &dev);
    assert!(blackmamba::model::fused::mamba_train::mixer_forward(&m, &x, &mut st)
        .unwrap()
        .is_none());
}
