//! A Mamba half-block's gradients without autograd (`runtime::grad::mamba_block`) against its twin,
//! autograd through `Model::block` (the fused autograd ops of `ops::mamba_grad`): the input's
//! gradient and every trained tensor's, for a bf16 model whose Mamba layer is trained in full,
//! over sequences of several scan chunks (the last one partial) and several channel blocks.
//! Both keep the same tensors in bf16; they differ in the order of additions (matmul algorithms,
//! atomics) and so in the last bf16 bit of some values. Runs only in a `--features cuda` build on
//! a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use blackmamba::runtime::grad::mamba_block::half_block_grads;
use candle_core::{Tensor, Var};
use gpu_common::{block_model, check_block_grads, device, train_layer};

#[test]
fn hand_written_mamba_backward_matches_autograd() {
    let Some(dev) = device() else { return };
    let mut model = block_model(32, 11, &dev);
    // layer 2 trained in full, as the trainer sets it up: f32 variables, the model holding bf16
    // casts of the projections' weights and the f32 variables themselves for the rest
    let layer = 2;
    let vars = train_layer(&mut model, layer);
    assert_eq!(
        vars.len(),
        10,
        "norm, in_proj, conv w and b, x_proj, dt_proj w and b, A_log, D, out_proj"
    );
    let (b, l, d) = (2, 80, model.cfg.hidden_size); // 80 = two chunks of 32 and a partial one
    let h = (Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap() * 0.5).unwrap();
    let g = (Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap() * 1e-2).unwrap();

    let fast = half_block_grads(&model, layer, &h, &g)
        .unwrap()
        .expect("the hand-written path applies");
    let hv = Var::from_tensor(&h).unwrap();
    let mut state = model.new_state(b).unwrap();
    let out = model.block(layer, hv.as_tensor(), &mut state, None, true, None).unwrap();
    let store = out.backward_seeded(&g).unwrap();

    assert_eq!(fast.params.len(), vars.len(), "a gradient for every trained tensor");
    check_block_grads(&fast, &store, &hv, &vars);
}
