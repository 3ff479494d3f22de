//! Tensor ops: the fused GPU kernels (`kernels/*.cu`, built by `build.rs` with feature `cuda`) and
//! the host ops, each beside its slow twin. Nothing here knows the model: every op takes tensors
//! (or device buffers) and sizes; `crate::model` chooses which op runs a layer's math.
//!
//! * `cuda`: loading the kernels, device pointers, launches (feature `cuda`); [`params`]: each
//!   kernel's `#[repr(C)]` params struct, the twin of `kernels/params.cuh` (built without CUDA
//!   too, so that `tests/kernel_params.rs` compares the two);
//! * [`act`]: the experts' activation and its kernel code;
//! * [`scan`]: the selective scan from tensor ops (the twin), [`scan_train::training_scan`] for
//!   fine-tuning; `scan_kernels`: the chunked scan kernels; `scan_grad`: the scan as an autograd
//!   op; [`scan_cpu`]: the same op on the CPU;
//! * `mamba_grad`, `mamba_kernels`: the Mamba mixer's conv + SiLU and scan + D·v + gate as
//!   autograd ops, and their kernels' launches (also used by the hand-written half-block backward);
//! * `gated_act`, `xent`, `rms_norm`: an expert's gated activation, the training loss's
//!   cross-entropy and the blocks' RMSNorm of the residual as autograd ops;
//! * `rows`: row selection with a scatter backward; `cast`: f32 <-> bf16 / f16 casts for every
//!   `to_dtype` (candle's cast hook); `optim`: AdamW and the gradient norm; `sinkhorn`: Sinkhorn
//!   on the device;
//! * [`prof`]: opt-in timing laps (`bench --finetune --profile`).

pub mod act;
#[cfg(feature = "cuda")]
pub mod cast;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod gated_act;
#[cfg(feature = "cuda")]
pub mod mamba_grad;
#[cfg(feature = "cuda")]
pub mod mamba_kernels;
#[cfg(feature = "cuda")]
pub mod optim;
pub mod params;
pub mod prof;
#[cfg(feature = "cuda")]
pub mod rms_norm;
#[cfg(feature = "cuda")]
pub mod rows;
#[cfg(feature = "cuda")]
pub mod sample;
pub mod scan;
pub mod scan_cpu;
pub mod scan_cpu_infer;
#[cfg(feature = "cuda")]
pub mod scan_grad;
#[cfg(feature = "cuda")]
pub mod scan_kernels;
pub mod scan_train;
#[cfg(feature = "cuda")]
pub mod sinkhorn;
#[cfg(feature = "cuda")]
pub mod xent;

/// Whether this build has the fused CUDA kernels.
pub fn available() -> bool {
    cfg!(feature = "cuda")
}
