//! Runtimes over a built [`crate::model::Model`]: how its math is driven for one job.
//!
//! * [`stepper`]: one decode step at a time for `generate`, the engine and the TUI: the
//!   graph-captured decoder on CUDA, [`crate::model::Model::step`] elsewhere, never a silent
//!   switch between the two;
//! * `decode`: the batch-1 decode step as a fixed list of kernel launches over static buffers,
//!   captured once as a CUDA graph, sampling on the device (feature `cuda`);
//! * [`dist`]: data-parallel training's ranks and collectives (the TCP star through rank 0);
//! * [`megakernel`]: issue 17's one-kernel-per-token decode: the per-SM instruction lists, their
//!   validator and the CPU interpreter that is the future kernel's slow twin (not on the user's
//!   path yet);
//! * `grad`: the training runtime's pieces that drive several layers' kernels at once: the
//!   recomputed step's first pass and the half-blocks differentiated by hand (feature `cuda`).

#[cfg(feature = "cuda")]
pub mod decode;
pub mod dist;
#[cfg(feature = "cuda")]
pub mod grad;
pub mod megakernel;
pub mod stepper;
