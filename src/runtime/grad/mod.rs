//! The fine-tuning step's GPU pieces over a `&Model` (used by `finetune::recompute`):
//!
//! * [`first_pass`]: pass 1 of the recomputed step on the inference kernels, deciding each MoE
//!   layer's route;
//! * [`mamba_block`], [`moe_block`]: a Mamba / MoE half-block's gradients without autograd
//!   (full fine-tuning of a bf16 model); autograd through the tensor ops is their twin.

pub mod first_pass;
pub mod mamba_block;
pub mod moe_block;

pub use first_pass::first_pass_block;
