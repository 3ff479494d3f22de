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
//! With `kernels.megakernel` (`--megakernel`, opt-in) a batch-1 bf16 or f32 model decodes on
//! the megakernel of `runtime::megakernel::cuda` (host sampling) instead; where it cannot (the
//! probe, another dtype or weight format) the path says why and the decoder runs.

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
    /// The CUDA megakernel (opt-in, `--megakernel`), sampling on the host.
    Megakernel,
    /// `--megakernel` was asked for but cannot take the model or settings (`why`); `then` ran.
    NotMegakernel { why: String, then: Box<StepPath> },
    /// [`Model::step`], with the reason the decoder was not used (`None`: it does not apply, as on
    /// the CPU, with kernels off or with `--no-decoder`).
    Model { reason: Option<String> },
}

impl std::fmt::Display for StepPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decoder { host_sampling: None } => write!(f, "CUDA decoder, sampling on the device"),
            Self::Decoder { host_sampling: Some(why) } => write!(f, "CUDA decoder, sampling on the host: {why}"),
            Self::Megakernel => write!(f, "CUDA megakernel, sampling on the host"),
            Self::NotMegakernel { why, then } => write!(f, "{then} (the megakernel cannot take {why})"),
            Self::Model { reason: None } => write!(f, "Model::step"),
            Self::Model { reason: Some(why) } => write!(f, "Model::step (the CUDA decoder cannot take {why})"),
        }
    }
}

/// One decode step at a time (see the module doc).
pub struct Stepper {
    #[cfg(feature = "cuda")]
    dec: Option<super::decode::Decoder>,
    #[cfg(feature = "cuda")]
    mega: Option<super::megakernel::cuda::MegaDecoder>,
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
        if model.kernels.megakernel && model.runs_kernels() && state.batch == 1 {
            match mega(model, state, probe)? {
                Ok(m) => {
                    return Ok(Self {
                        dec: None,
                        mega: Some(m),
                        path: StepPath::Megakernel,
                        fed_by_device: None,
                    })
                }
                Err(why) => {
                    let mut s = Self::decoder_or_model(model, state, probe, sampler, history)?;
                    s.path = StepPath::NotMegakernel {
                        why,
                        then: Box::new(s.path),
                    };
                    return Ok(s);
                }
            }
        }
        Self::decoder_or_model(model, state, probe, sampler, history)
    }

    /// [`Stepper::new`] without the megakernel: the graph decoder where it applies, else
    /// [`Model::step`].
    fn decoder_or_model(model: &Model, state: &State, probe: bool, sampler: &Sampler, history: &[u32]) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if model.kernels.decoder && model.runs_kernels() && state.batch == 1 {
            use super::decode::{DecodeOpts, Decoder};
            if let Err(why) = Decoder::supports(model) {
                return Ok(Self {
                    dec: None,
                    mega: None,
                    path: StepPath::Model { reason: Some(why) },
                    fed_by_device: None,
                });
            }
            let on_device = match model.kernels.sampler {
                true => crate::ops::sample::supports(&sampler.params),
                false => Err("--host-sampler asked for the host sampler".to_string()),
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
                mega: None,
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
            #[cfg(feature = "cuda")]
            mega: None,
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
        if let Some(m) = self.mega.as_mut() {
            let out = m.step(id)?;
            state.pos += 1;
            return Ok(sampler.sample(&out.logits, history));
        }
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
            let path = match &self.path {
                StepPath::NotMegakernel { then, .. } => &**then,
                p => p,
            };
            if matches!(path, StepPath::Decoder { host_sampling: None }) {
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
        #[cfg(feature = "cuda")]
        if let Some(m) = self.mega {
            mega_state(model, &m.state()?, state)?;
        }
        let _ = (model, state);
        Ok(())
    }
}

/// The megakernel for `model` from `state`, or why it cannot take them (`Ok(Err(..))`; an
/// error only when it applies and fails to build).
#[cfg(feature = "cuda")]
fn mega(model: &Model, state: &State, probe: bool) -> Result<std::result::Result<super::megakernel::cuda::MegaDecoder, String>> {
    use super::megakernel::cuda::{MegaDecoder, MegaOpts};
    use super::megakernel::{FormatPlan, HostState, WeightFormat};
    let format = match model.dtype {
        candle_core::DType::BF16 => WeightFormat::Bf16,
        candle_core::DType::F32 => WeightFormat::F32,
        other => return Ok(Err(format!("{other:?} weights (bf16 and f32 only)"))),
    };
    if probe {
        return Ok(Err("the probe (no telemetry yet)".into()));
    }
    let opts = MegaOpts {
        formats: FormatPlan::uniform(format),
        ..Default::default()
    };
    if let Err(why) = MegaDecoder::supports(model, &model.device, &opts.formats) {
        return Ok(Err(why));
    }
    let mut m = MegaDecoder::new(model, &model.device, &opts)?;
    m.load_state(&HostState::from_state(state)?)?;
    Ok(Ok(m))
}

/// Writes the megakernel's state into the Mamba layers of `state` (f32, as the decoder does).
#[cfg(feature = "cuda")]
fn mega_state(model: &Model, host: &super::megakernel::HostState, state: &mut State) -> Result<()> {
    let cfg = &model.cfg;
    let (di, k, n) = (cfg.d_inner(), cfg.conv_dimension, cfg.state_size);
    for (i, l) in state.layers.iter_mut().enumerate() {
        if let (Some(l), Some(c), Some(h)) = (l.as_mut(), host.conv.get(i), host.ssm.get(i)) {
            l.conv = Tensor::from_slice(c, (1, di, k), &model.device)?;
            l.ssm = Tensor::from_slice(h, (1, di, n), &model.device)?;
        }
    }
    Ok(())
}
