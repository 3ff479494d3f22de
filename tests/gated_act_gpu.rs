//! The fused gated activation (`ops::gated_act`, kernels/gated_act.cu) against its twin, the
//! tensor ops of `Mlp::forward` (two narrows, gelu_erf or SiLU, a product): output and input
//! gradient, f32 and bf16, both activations. Runs only in a `--features cuda` build on a machine
//! with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use blackmamba::model::config::Activation;
use blackmamba::ops::gated_act::gated_act;
use candle_core::{DType, Tensor, Var, D};
use gpu_common::rel;

/// The tensor-op twin: a (n, 2f) -> act(a[:, :f]) ⊙ a[:, f:].
fn twin(a: &Tensor, act: Activation) -> Tensor {
    let f = a.dim(D::Minus1).unwrap() / 2;
    let g = a.narrow(D::Minus1, 0, f).unwrap();
    let u = a.narrow(D::Minus1, f, f).unwrap();
    let g = match act {
        Activation::Gelu => g.gelu_erf().unwrap(),
        Activation::Silu => candle_nn::ops::silu(&g).unwrap(),
    };
    (g * u).unwrap()
}

/// Output and ∂Σ(h ⊙ dh)/∂a of `f` at a.
fn run(a: &Tensor, dh: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let v = Var::from_tensor(a).unwrap();
    let h = f(v.as_tensor());
    let g = (&h * dh).unwrap().sum_all().unwrap().backward().unwrap();
    (h.detach(), g.get(v.as_tensor()).unwrap().clone())
}

#[test]
fn gated_activation_matches_its_twin() {
    let Some(dev) = gpu_common::device() else { return };
    // odd row count and a width that is not a multiple of the block, values well past ±3
    let (n, f) = (37, 1000);
    let a32 = (Tensor::randn(0f32, 1.0, (n, 2 * f), &dev).unwrap() * 2.5).unwrap();
    let dh32 = Tensor::randn(0f32, 1.0, (n, f), &dev).unwrap();
    let mut bad = Vec::new();
    for act in [Activation::Gelu, Activation::Silu] {
        // f32: the same math, only the order of float operations differs
        let (h, da) = run(&a32, &dh32, |a| gated_act(a, act).unwrap());
        let (ht, dat) = run(&a32, &dh32, |a| twin(a, act));
        for (what, r) in [("f32 h", rel(&h, &ht)), ("f32 da", rel(&da, &dat))] {
            eprintln!("{act:?} {what}: rel {r:.2e}");
            if r.is_nan() || r > 1e-5 {
                bad.push(format!("{act:?} {what}: {r:.2e}"));
            }
        }
        // bf16: both against the f32 twin on the same (bf16-rounded) values; the fused op rounds
        // once per stored value, so it must be at least as close as the bf16 twin (plus slack)
        let a16 = a32.to_dtype(DType::BF16).unwrap();
        let dh16 = dh32.to_dtype(DType::BF16).unwrap();
        let (h, da) = run(&a16, &dh16, |a| gated_act(a, act).unwrap());
        let (ht, dat) = run(&a16, &dh16, |a| twin(a, act));
        let (hr, dar) = run(&a16.to_dtype(DType::F32).unwrap(), &dh16.to_dtype(DType::F32).unwrap(), |a| {
            twin(a, act)
        });
        assert_eq!(h.dtype(), DType::BF16);
        assert_eq!(da.dtype(), DType::BF16);
        for (what, fused, tw) in [
            ("bf16 h", rel(&h, &hr), rel(&ht, &hr)),
            ("bf16 da", rel(&da, &dar), rel(&dat, &dar)),
        ] {
            eprintln!("{act:?} {what}: fused rel {fused:.2e}, twin rel {tw:.2e} (to f32)");
            let ok = fused <= 8e-3 && fused <= tw.max(4e-3) * 1.5;
            if !ok {
                bad.push(format!("{act:?} {what}: fused {fused:.2e}, twin {tw:.2e}"));
            }
        }
    }
    assert!(bad.is_empty(), "mismatches: {bad:?}");
}
