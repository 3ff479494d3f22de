//! The selective scan of fine-tuning: the fused autograd ops where they run (CPU and CUDA), with
//! the tensor-op scan of [`super::scan`] as their twin.

use candle_core::Tensor;

use super::scan::ScanOut;
use crate::error::Result;

/// Which fused scan a full-sequence read takes (`Model::fused_scan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedScan {
    /// The tensor-op scan of [`super::scan`] (`--no-kernels`, or where no fused op runs).
    Off,
    /// Fine-tuning: [`training_scan`] (autograd ops keeping only their inputs).
    Train,
    /// Inference on the CPU: the f32 loop of [`super::scan_cpu_infer`] (no autograd).
    Infer,
}

/// The selective scan for fine-tuning: on the GPU y through the autograd op of `scan_grad`
/// (fused forward and backward kernels), the final state through the inference scan kernel (the
/// state is never differentiated); on the CPU the op of [`super::scan_cpu`]. `None` where neither can
/// run (CUDA tensors in a build without `cuda`, N > 16 on CUDA): the caller then uses the
/// tensor-op scan, the twin both are tested against.
pub fn training_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor) -> Result<Option<ScanOut>> {
    if v.device().is_cpu() {
        return super::scan_cpu::selective_scan(v, delta, a, b, c, h0).map(Some);
    }
    #[cfg(feature = "cuda")]
    if v.device().is_cuda() && a.dim(1)? <= 16 {
        let y = super::scan_grad::selective_scan_grad(v, delta, a, b, c, Some(h0))?;
        let last = super::scan_kernels::selective_scan(
            &v.detach(),
            &delta.detach(),
            &a.detach(),
            &b.detach(),
            &c.detach(),
            &h0.detach(),
            false,
        )?;
        return Ok(Some(ScanOut {
            y,
            h_last: last.h_last,
            h_norm: None,
        }));
    }
    let _ = (v, delta, a, b, c, h0);
    Ok(None)
}
