//! One decode step at a time, for `generate` (and through it the engine and the TUI).
//!
//! On CUDA, where the model runs its kernels at batch 1, every step is the graph-captured
//! decoder of `runtime::decode`, which also samples the next token on the device
//! (`ops::sample`, the host sampler's semantics): only the token id (and the probe's telemetry)
//! comes back to the host. Elsewhere each step is [`Model::step`] and the host samples.
//!
//! Which path runs is decided once, when the stepper is built, and reported by
//! [`Stepper::path`]; it never changes behind the caller's back. A model the decoder cannot take
//! (an adapter left unmerged, a dense layer, a mixed dtype) or sampling settings the device
//! cannot reproduce (top-k off) are reported there with the reason; a decoder that fails while
//! building or stepping is an error, not a quiet switch to the slower path. [`Model::step`] can
//! also be asked for: the model's `kernels.decoder` off (`--no-decoder`).

use candle_core::Tensor;

use crate::error::Result;
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::Model;
use crate::sampling::Sampler;

/// The path a [`Stepper`] took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPath {
    /// The graph-captured CUDA decoder; `host_sampling` says why the logits go to the host to be
    /// sampled there (`None`: sampled on the device).
    Decoder { host_sampling: Option<String> },
    /// [`Model::step`], with the reason the decoder was not used (`None`: it does not apply, as on
    /// the CPU, with kernels off or with `--no-decoder`).
    Model { reason: Option<String> },
}

impl std::fmt::Display for StepPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decoder { host_sampling: None } => write!(f, "CUDA decoder, sampling on the device"),
            Self::Decoder { host_sampling: Some(why) } => write!(f, "CUDA decoder, sampling on the host: {why}"),
            Self::Model { reason: None } => write!(f, "Model::step"),
            Self::Model { reason: Some(why) } => write!(f, "Model::step (the CUDA decoder cannot take {why})"),
        }
    }
}

/// One decode step at a time (see the module doc).
pub struct Stepper {
    #[cfg(feature = "cuda")]
    dec: Option<super::decode::Decoder>,
    path: StepPath,
    /// The token the device sampled last: already the decoder's next input.
    #[cfg(feature = "cuda")]
    fed_by_device: Option<u32>,
}

impl Stepper {
    /// Prepares stepping from `state` (whose last token has been fed), sampling with `sampler`'s
    /// settings and generator after `history` (the tokens so far). An error only where the
    /// decoder applies and fails to build or capture.
    pub fn new(model: &Model, state: &State, probe: bool, sampler: &Sampler, history: &[u32]) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if model.kernels.decoder && model.runs_kernels() && state.batch == 1 {
            use super::decode::{DecodeOpts, Decoder};
            if let Err(why) = Decoder::supports(model) {
                return Ok(Self {
                    dec: None,
                    path: StepPath::Model { reason: Some(why) },
                    fed_by_device: None,
                });
            }
            let on_device = match model.kernels.sampler {
                true => crate::ops::sample::supports(&sampler.params),
                false => Err("the device sampler is opt-in (--device-sampler)".to_string()),
            };
            let opts = DecodeOpts {
                probe,
                sampler: on_device.is_ok(),
                ..Default::default()
            };
            let mut d = Decoder::new(model, opts)?;
            d.load_state(state)?;
            if on_device.is_ok() {
                d.set_sampling(&sampler.params, sampler.rng_state(), history)?;
            }
            d.capture()?;
            return Ok(Self {
                dec: Some(d),
                path: StepPath::Decoder {
                    host_sampling: on_device.err(),
                },
                fed_by_device: None,
            });
        }
        let _ = (model, state, probe, sampler, history);
        Ok(Self {
            #[cfg(feature = "cuda")]
            dec: None,
            path: StepPath::Model { reason: None },
            #[cfg(feature = "cuda")]
            fed_by_device: None,
        })
    }

    /// The path this stepper runs.
    pub fn path(&self) -> &StepPath {
        &self.path
    }

    /// Feeds `id` (already pushed to `history`), advancing `state.pos`, and returns the next
    /// token: sampled on the device, or on the host by `sampler` from the step's logits.
    pub fn next(
        &mut self,
        model: &Model,
        id: u32,
        state: &mut State,
        probe: Option<&mut Probe>,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32> {
        #[cfg(feature = "cuda")]
        if let Some(d) = self.dec.as_mut() {
            if self.fed_by_device != Some(id) {
                d.set_token(id)?;
            }
            let tok = d.step()?;
            if let Some(p) = probe {
                d.record_probe(0, p)?;
            }
            state.pos += 1;
            if matches!(self.path, StepPath::Decoder { host_sampling: None }) {
                self.fed_by_device = Some(tok);
                return Ok(tok);
            }
            self.fed_by_device = None;
            let logits = d.logits()?;
            return Ok(sampler.sample(&logits, history));
        }
        let l = model.step(&Tensor::from_slice(&[id], 1, &model.device)?, state, probe)?; // (1, V)
        let logits: Vec<f32> = l.flatten_all()?.to_vec1()?;
        Ok(sampler.sample(&logits, history))
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
