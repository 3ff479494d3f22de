//! The op profile of the vendored candle-core's backward pass (our patch,
//! vendor/candle-core/PATCH.md): off by default and then empty; switched on, a backward on the
//! CPU fills it by op kind, with the gradient accumulation under its own key, and the gradients
//! are the same. One test in this binary, since the switch is process-wide. No timings checked.

#![allow(clippy::unwrap_used)]

use candle_core::backprop::{op_profile_enabled, op_profile_totals, set_op_profile, ACCUMULATE, SORT};
use candle_core::{Device, Tensor, Var};

/// A tiny graph with a matmul, unary and binary ops, a cast, a reduction and a tensor used twice
/// (so its gradient is accumulated); the gradient of w.
fn grad_of_w(w: &Var, x: &Tensor) -> Vec<Vec<f32>> {
    let y = x.matmul(w.as_tensor()).unwrap(); // (2, 2)
    let z = (y.exp().unwrap() * &y).unwrap(); // y used twice
    let loss = z.to_dtype(candle_core::DType::F64).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    g.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn op_profile_is_empty_when_off_and_filled_by_op_kind_when_on() {
    let dev = Device::Cpu;
    let w = Var::new(&[[0.1f32, 0.2], [0.3, -0.4]], &dev).unwrap();
    let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();

    assert!(!op_profile_enabled(), "off by default");
    let off = grad_of_w(&w, &x);
    assert!(op_profile_totals().is_empty(), "{:?}", op_profile_totals());

    set_op_profile(true);
    let on = grad_of_w(&w, &x);
    let totals = op_profile_totals();
    set_op_profile(false);
    assert_eq!(on, off, "profiling changes no gradient");
    let names: Vec<&str> = totals.iter().map(|t| t.0.as_str()).collect();
    for want in ["matmul", "unary exp", "binary mul", "cast f32->f64", "reduce sum", ACCUMULATE, SORT] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(totals.iter().all(|t| t.1 >= 0.0 && t.2 >= 1), "{totals:?}");
    assert!(totals.windows(2).all(|p| p[0].1 >= p[1].1), "longest first: {totals:?}");
    let count = |k: &str| totals.iter().find(|t| t.0 == k).map_or(0, |t| t.2);
    assert_eq!(count("matmul"), 1);
    assert_eq!(count(SORT), 1);

    assert!(op_profile_totals().is_empty(), "switching off clears the totals");
    let _ = grad_of_w(&w, &x);
    assert!(op_profile_totals().is_empty(), "nothing recorded while off");
}
