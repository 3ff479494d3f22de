//! `RowPermutation` (MoE token grouping): the same rows as `index_select`, the same gradient as
//! autograd through `index_select` (its backward being the inverse permutation instead of an
//! `index_add`), an inverse that undoes it, and errors for what is not a permutation.

#![allow(clippy::unwrap_used)]

use blackmamba::model::permute::RowPermutation;
use candle_core::{Device, Tensor, Var};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 100.0 - 5.0)
        .collect()
}

#[test]
fn permuted_rows_and_their_gradient_match_index_select() {
    let dev = Device::Cpu;
    let perm: Vec<u32> = vec![3, 0, 6, 1, 5, 2, 4];
    let p = RowPermutation::new(&perm, &dev).unwrap();
    let x = Var::from_tensor(&Tensor::from_vec(values(7 * 5, 1), (7, 5), &dev).unwrap()).unwrap();
    let w = Tensor::from_vec(values(7 * 5, 9), (7, 5), &dev).unwrap();
    let idx = Tensor::from_slice(&perm, 7, &dev).unwrap();

    let ours = p.apply(x.as_tensor()).unwrap();
    let theirs = x.as_tensor().index_select(&idx, 0).unwrap();
    assert_eq!(ours.to_vec2::<f32>().unwrap(), theirs.to_vec2::<f32>().unwrap());

    // a loss that weighs every output value differently, so a wrong backward shows
    let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_theirs = (theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(
        g_ours.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        g_theirs.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
    );

    let back = p.inverse().apply(&p.apply(x.as_tensor()).unwrap()).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), x.as_tensor().to_vec2::<f32>().unwrap());
}

#[test]
fn a_non_permutation_or_a_wrong_row_count_is_an_error() {
    let dev = Device::Cpu;
    for bad in [vec![0u32, 0, 1], vec![0, 1, 3]] {
        let e = RowPermutation::new(&bad, &dev).err().unwrap().to_string();
        assert!(e.contains("out of range or repeated"), "{e}");
    }
    let p = RowPermutation::new(&[1, 0], &dev).unwrap();
    let e = p
        .apply(&Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 rows") && e.contains("[3, 2]"), "{e}");
}
