//! A MoE half-block's gradients without autograd (`runtime::grad::moe_block`) against its twin,
//! autograd through `Model::block` with the same Sinkhorn route: the input's gradient and every
//! trained tensor's (norm, router weight and bias, each expert's fc1 and fc2), for a bf16 model
//! whose MoE layer is trained in full. Both keep the same tensors in bf16; they differ in the order
//! of additions and so in the last bf16 bit of some values. Runs only in a `--features cuda` build
//! on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use blackmamba::model::moe::Routing;
use blackmamba::runtime::grad::moe_block::half_block_grads;
use blackmamba::sinkhorn::SinkhornOpts;
use candle_core::{Tensor, Var};
use gpu_common::{block_model, check_block_grads, device, train_layer};

#[test]
fn hand_written_moe_backward_matches_autograd() {
    let Some(dev) = device() else { return };
    let mut model = block_model(96, 12, &dev);
    model.routing = Routing::Sinkhorn(SinkhornOpts::default());
    let layer = 1;
    let vars = train_layer(&mut model, layer);
    assert_eq!(vars.len(), 1 + 2 + 8 * 2, "norm, router weight and bias, 8 experts' fc1 and fc2");
    let (b, l, d) = (2, 80, model.cfg.hidden_size);
    let h = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
    let g = (Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap() * 1e-2).unwrap();

    // pass 1 decides the route (Sinkhorn over the 160 tokens), both then reuse it
    let mut route = None;
    model
        .block(layer, &h, &mut model.new_state(b).unwrap(), None, true, Some(&mut route))
        .unwrap();
    let experts = route.as_ref().unwrap().experts().to_vec();
    assert!(
        (0..8u32).filter(|e| experts.contains(e)).count() >= 6,
        "most experts get tokens: {experts:?}"
    );

    let fast = half_block_grads(&model, layer, &h, &g, route.as_ref())
        .unwrap()
        .expect("the hand-written path applies");
    let hv = Var::from_tensor(&h).unwrap();
    let out = model
        .block(
            layer,
            hv.as_tensor(),
            &mut model.new_state(b).unwrap(),
            None,
            true,
            Some(&mut route),
        )
        .unwrap();
    let store = out.backward_seeded(&g).unwrap();

    check_block_grads(&fast, &store, &hv, &vars);
}
