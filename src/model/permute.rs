//! Row permutations with a cheap backward, for grouping a MoE layer's tokens by expert.
//!
//! Autograd's backward of `index_select` is an `index_add`, which candle's CUDA backend runs with
//! one thread per column looping over every row: at 16,384 tokens of 1,472 values that took tens
//! of milliseconds per MoE layer (most of a fine-tuning step's MoE backward). The backward of a
//! permutation is the inverse permutation: one more `index_select`, parallel over every value.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};

use crate::error::{Error, Result};

/// A permutation of n rows: `apply` gives out\[i\] = x\[perm\[i\]\].
#[derive(Debug, Clone)]
pub struct RowPermutation {
    /// (n) u32
    perm: Tensor,
    /// (n) u32, the inverse: inv\[perm\[i\]\] = i
    inv: Tensor,
}

impl RowPermutation {
    /// `perm` must hold each of 0..n exactly once.
    pub fn new(perm: &[u32], dev: &Device) -> Result<Self> {
        let n = perm.len();
        let mut inv = vec![u32::MAX; n];
        for (i, &p) in perm.iter().enumerate() {
            match inv.get_mut(p as usize) {
                Some(slot) if *slot == u32::MAX => *slot = i as u32,
                _ => return Err(Error::Invalid(format!("row permutation: {p} is out of range or repeated"))),
            }
        }
        Ok(Self {
            perm: Tensor::from_slice(perm, n, dev)?,
            inv: Tensor::from_vec(inv, n, dev)?,
        })
    }

    /// (perm, inv), each (n) u32 on the device.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn indices(&self) -> (&Tensor, &Tensor) {
        (&self.perm, &self.inv)
    }

    /// The permutation that undoes this one.
    pub fn inverse(&self) -> Self {
        Self {
            perm: self.inv.clone(),
            inv: self.perm.clone(),
        }
    }

    /// x (n, ..) -> (n, ..) with rows reordered; differentiable, its backward the inverse.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(0)? != self.perm.dim(0)? {
            return Err(Error::Invalid(format!(
                "row permutation of {} rows applied to a tensor of shape {:?}",
                self.perm.dim(0)?,
                x.dims()
            )));
        }
        Ok(x.apply_op1_arc(std::sync::Arc::new(Box::new(PermuteRows(self.clone()))))?)
    }
}

struct PermuteRows(RowPermutation);

impl CustomOp1 for PermuteRows {
    fn name(&self) -> &'static str {
        "permute-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ids, ids_l) = self.0.perm.storage_and_layout();
        match &*ids {
            Storage::Cpu(ids) => Ok((storage.index_select(ids, layout, ids_l, 0)?, layout.shape().clone())),
            _ => candle_core::bail!("permute-rows: the permutation is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ids, ids_l) = self.0.perm.storage_and_layout();
        match &*ids {
            Storage::Cuda(ids) => Ok((storage.index_select(ids, layout, ids_l, 0)?, layout.shape().clone())),
            _ => candle_core::bail!("permute-rows: the permutation is not on the GPU"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.index_select(&self.0.inv, 0)?))
    }
}
