//! Row selection with a scatter backward (`ops::rows`) against its twin, candle's `index_select`
//! and its backward (`index_add`): the rows, the gradient through a variable, and a scatter with
//! repeated indices from f32 and bf16 sources. Runs only in a `--features cuda` build on a
//! machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod gpu_common;

use blackmamba::ops::rows::{scatter_add_rows, select_rows};
use candle_core::{DType, Tensor, Var};
use gpu_common::{device, host, rel};

#[test]
fn select_and_scatter_rows_match_index_select_and_index_add() {
    let Some(dev) = device() else { return };
    let (r, d) = (300, 193);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap()).unwrap();
    let idx: Vec<u32> = (0..517u32).map(|i| (i * 37 + i / 3) % r as u32).collect(); // repeats
    let idx = Tensor::from_vec(idx, 517, &dev).unwrap();
    let g = Tensor::randn(0f32, 1.0, (517, d), &dev).unwrap();

    let fast = select_rows(x.as_tensor(), &idx).unwrap();
    let slow = x.as_tensor().index_select(&idx, 0).unwrap();
    assert_eq!(host(&fast), host(&slow), "selected rows");
    let gf = fast.backward_seeded(&g).unwrap();
    let gs = slow.backward_seeded(&g).unwrap();
    let e = rel(gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
    eprintln!("gradient: {e:.2e}");
    assert!(e < 1e-6, "gradient differs by {e}");

    let want = Tensor::zeros((r, d), DType::F32, &dev).unwrap().index_add(&idx, &g, 0).unwrap();
    let e = rel(&scatter_add_rows(&g, &idx, r).unwrap(), &want);
    assert!(e < 1e-6, "f32 scatter differs by {e}");
    let g16 = g.to_dtype(DType::BF16).unwrap();
    let want16 = Tensor::zeros((r, d), DType::F32, &dev)
        .unwrap()
        .index_add(&idx, &g16.to_dtype(DType::F32).unwrap(), 0)
        .unwrap();
    let e = rel(&scatter_add_rows(&g16, &idx, r).unwrap(), &want16);
    assert!(e < 1e-6, "bf16 scatter differs by {e}");
}
