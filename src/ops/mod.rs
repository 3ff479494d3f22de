//! Fused GPU kernels (`kernels/*.cu`, built by `build.rs` with feature `cuda`) and the code that
//! runs them. Each fused op has a slow twin: the tensor-op path of `crate::model`, which the CPU
//! always runs and which `tests/gpu_parity.rs` compares the kernels against on the GPU.
//!
//! * `fused`: the model's forward/step on CUDA (fused norms, conv, scan, Mamba step, MoE routing);
//! * `decode`: the batch-1 decode step as a fixed list of launches over static buffers, run
//!   eagerly or as one CUDA graph, sampling on device;
//! * `sinkhorn`: Sinkhorn iterations on device;
//! * `scan_grad`: the chunked selective scan as an autograd op (forward and backward kernels);
//! * `mamba_grad`: the Mamba mixer's conv + SiLU and scan + D·v + gate as autograd ops (training);
//! * `mamba_block_grad`, `moe_block_grad`: a Mamba / MoE half-block's gradients without autograd
//!   (full fine-tuning);
//!   `mamba_kernels` launches both's kernels;
//! * `gated_act`, `xent`, `rms_norm`: an expert's gated activation, the training loss's
//!   cross-entropy and the blocks' RMSNorm of the residual as autograd ops (fine-tuning);
//! * [`scan_cpu`]: the same autograd op on the CPU (plain loops; fine-tuning on the CPU);
//! * `rows`: row selection with a scatter backward (the loss's positions, the embedding);
//! * `cast`: f32 <-> bf16 / f16 casts for every `to_dtype` (candle's cast hook);
//! * `cuda`: loading the kernels, device pointers, launches.
//!
//! Without feature `cuda` only [`available`], [`scan_cpu`] and [`training_scan`] exist.

#[cfg(feature = "cuda")]
pub mod cast;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod decode;
#[cfg(feature = "cuda")]
pub mod fused;
#[cfg(feature = "cuda")]
pub mod gated_act;
#[cfg(feature = "cuda")]
pub mod mamba_block_grad;
#[cfg(feature = "cuda")]
pub mod mamba_grad;
#[cfg(feature = "cuda")]
pub mod mamba_kernels;
#[cfg(feature = "cuda")]
pub mod moe_block_grad;
#[cfg(feature = "cuda")]
pub mod optim;
pub mod prof;
#[cfg(feature = "cuda")]
pub mod rms_norm;
#[cfg(feature = "cuda")]
pub mod rows;
pub mod scan_cpu;
#[cfg(feature = "cuda")]
pub mod scan_grad;
#[cfg(feature = "cuda")]
pub mod sinkhorn;
#[cfg(feature = "cuda")]
pub mod xent;

/// Whether this build has the fused CUDA kernels.
pub fn available() -> bool {
    cfg!(feature = "cuda")
}

/// Whether the fused kernels are to be used: a CUDA build, and `BLACKMAMBA_NO_KERNELS` unset
/// (or empty or 0), as [`crate::model::Model::use_kernels`] starts.
pub fn kernels_enabled() -> bool {
    available() && std::env::var_os("BLACKMAMBA_NO_KERNELS").is_none_or(|v| v.is_empty() || v == "0")
}

use candle_core::Tensor;

use crate::error::Result;
use crate::model::probe::Probe;
use crate::model::scan::ScanOut;
use crate::model::state::State;
use crate::model::Model;

/// The selective scan for fine-tuning: on the GPU y through the autograd op of `scan_grad`
/// (fused forward and backward kernels), the final state through the inference scan kernel (the
/// state is never differentiated); on the CPU the op of [`scan_cpu`]. `None` where neither can
/// run (CUDA tensors in a build without `cuda`, N > 16 on CUDA): the caller then uses the
/// tensor-op scan, the twin both are tested against.
pub fn training_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor) -> Result<Option<ScanOut>> {
    if v.device().is_cpu() {
        return scan_cpu::selective_scan(v, delta, a, b, c, h0).map(Some);
    }
    #[cfg(feature = "cuda")]
    if v.device().is_cuda() && a.dim(1)? <= 16 {
        let y = scan_grad::selective_scan_grad(v, delta, a, b, c, Some(h0))?;
        let last = fused::mamba::selective_scan(
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

/// One decode step at a time for [`crate::generate::generate`]: the graph-captured
/// `decode::Decoder` when the model runs the kernels at batch 1, else [`Model::step`]. The
/// logits come back to the host (the generate loop samples there, with every sampling option).
pub struct Stepper {
    #[cfg(feature = "cuda")]
    dec: Option<decode::Decoder>,
}

impl Stepper {
    /// Prepares stepping from `state` (whose last token has been fed).
    pub fn new(model: &Model, state: &State, probe: bool) -> Self {
        #[cfg(feature = "cuda")]
        if model.runs_kernels() && state.batch == 1 {
            let opts = decode::DecodeOpts {
                probe,
                ..Default::default()
            };
            if let Ok(mut d) = decode::Decoder::new(model, opts) {
                if d.load_state(state).is_ok() && d.capture().is_ok() {
                    return Self { dec: Some(d) };
                }
            }
        }
        let _ = (model, state, probe);
        Self {
            #[cfg(feature = "cuda")]
            dec: None,
        }
    }

    /// Feeds `id`, advancing `state.pos`; returns the next logits (V).
    pub fn step(&mut self, model: &Model, id: u32, state: &mut State, probe: Option<&mut Probe>) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if let Some(d) = self.dec.as_mut() {
            d.set_token(id)?;
            d.step()?;
            if let Some(p) = probe {
                d.record_probe(0, p)?;
            }
            state.pos += 1;
            return d.logits();
        }
        let l = model.step(&Tensor::from_slice(&[id], 1, &model.device)?, state, probe)?;
        Ok(l.flatten_all()?.to_vec1()?)
    }

    /// Writes the stepped state back into `state` (a no-op when `Model::step` did the stepping).
    pub fn finish(self, model: &Model, state: &mut State) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = self.dec {
            *state = d.state(model, state.pos)?;
        }
        let _ = (model, state);
        Ok(())
    }
}
