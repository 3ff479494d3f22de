//! `Tensor::backward_seeded` of the vendored candle-core (patch 4, vendor/candle-core/PATCH.md):
//! the backward pass from a given output gradient equals the backward of Σ out ⊙ g, and a seed of
//! the wrong shape is an error.

#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};

#[test]
fn seeded_backward_equals_the_backward_of_the_weighted_sum() {
    let dev = Device::Cpu;
    let w = Var::new(&[[0.1f32, 0.2, -0.7], [0.3, -0.4, 0.9]], &dev).unwrap(); // (2, 3)
    let x = Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap(); // (2, 2)
    let g = Tensor::new(&[[1.5f32, -2.0, 0.5], [0.25, 3.0, -1.0]], &dev).unwrap(); // (2, 3)
    let out = |x: &Var| {
        let y = x.as_tensor().matmul(w.as_tensor()).unwrap(); // (2, 3)
        (y.tanh().unwrap() * &y).unwrap() // y used twice
    };
    let by_sum = (out(&x) * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let seeded = out(&x).backward_seeded(&g).unwrap();
    for v in [w.as_tensor(), x.as_tensor()] {
        let a = by_sum.get(v).unwrap().to_vec2::<f32>().unwrap();
        let b = seeded.get(v).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
    }
    // with ones it is the plain backward
    let ones = out(&x).backward_seeded(&g.ones_like().unwrap()).unwrap();
    let plain = out(&x).backward().unwrap();
    assert_eq!(
        ones.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        plain.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
    );
    let bad = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
    assert!(out(&x).backward_seeded(&bad).is_err());
}
