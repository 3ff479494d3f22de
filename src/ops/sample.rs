//! Next-token sampling on the GPU (kernels/sample.cu): the host sampler's semantics
//! ([`crate::sampling::Sampler::sample`]: repetition penalty, greedy or temperature with top-k,
//! min-p and top-p, the same SplitMix64 draws) over a logits buffer that never leaves the device.
//! The decoder of `runtime::decode` ends its step with this kernel; [`DeviceSampler::sample`] runs
//! it alone on a logits tensor (its parity test against the host sampler, `tests/gpu_parity.rs`).
//!
//! The device takes what fits one block: with a positive temperature, top-k from 1 to
//! [`MAX_TOP_K`], and a penalty window of at most [`HIST_CAP`] tokens ([`supports`]); anything
//! else is sampled on the host by the caller.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::result as cu;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, func, Launch, Module};
use crate::ops::params::{to_i32, SampleLogitsParams};
use crate::sampling::SamplingParams;

/// Threads of the sampling kernel (`SAMPLE_THREADS`).
pub const THREADS: u32 = 1024;
/// The largest top-k the device samples (`SAMPLE_MAX_K`).
pub const MAX_TOP_K: usize = 1024;
/// Tokens of history the device keeps for the repetition penalty.
pub const HIST_CAP: usize = 1024;

/// The sampler's settings and running state, `SampleState` of kernels/sample.cu (same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleState {
    /// SplitMix64 state (`Rng::state`).
    pub rng: u64,
    /// (0, 1]; 1 = off.
    pub top_p: f64,
    /// <= 0: greedy.
    pub temperature: f32,
    pub repeat_penalty: f32,
    /// `(temperature · ln min_p) as f32`, as the host sampler computes its cut.
    pub min_p_delta: f32,
    /// 1 when min_p > 0.
    pub min_p_on: i32,
    pub top_k: i32,
    /// Penalty window (0: no penalty).
    pub last_n: i32,
    pub hist_cap: i32,
    pub hist_len: u32,
    pub hist_head: u32,
    /// Random draws taken so far.
    pub draws: u32,
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out as the kernel declares it.
unsafe impl DeviceRepr for SampleState {}

/// Whether the device sampler reproduces `p`; `Err` names what it cannot take.
pub fn supports(p: &SamplingParams) -> std::result::Result<(), String> {
    p.validate().map_err(|e| e.to_string())?;
    if p.temperature > 0.0 && !(1..=MAX_TOP_K).contains(&p.top_k) {
        return Err(format!(
            "top-k {} (the device samples top-k 1 to {MAX_TOP_K}; 0 = off samples on the host)",
            p.top_k
        ));
    }
    if penalty_on(p) && p.repeat_last_n > HIST_CAP {
        return Err(format!(
            "a repeat-penalty window of {} tokens (at most {HIST_CAP} on the device)",
            p.repeat_last_n
        ));
    }
    Ok(())
}

/// The host sampler's test for an active penalty.
fn penalty_on(p: &SamplingParams) -> bool {
    (p.repeat_penalty - 1.0).abs() > f32::EPSILON
}

impl SampleState {
    /// The state for settings `p` (see [`supports`]) with the generator at `rng` and `hist_len`
    /// tokens of history in a ring of [`HIST_CAP`] whose next slot is `hist_head`.
    pub fn new(p: &SamplingParams, rng: u64, hist_len: usize, hist_head: usize) -> Self {
        let on = penalty_on(p);
        Self {
            rng,
            top_p: p.top_p,
            temperature: p.temperature as f32,
            repeat_penalty: p.repeat_penalty,
            min_p_delta: if p.min_p > 0.0 {
                (p.temperature * p.min_p.ln()) as f32
            } else {
                0.0
            },
            min_p_on: i32::from(p.min_p > 0.0),
            top_k: p.top_k.min(MAX_TOP_K) as i32,
            last_n: if on { p.repeat_last_n.min(HIST_CAP) as i32 } else { 0 },
            hist_cap: HIST_CAP as i32,
            hist_len: hist_len.min(HIST_CAP) as u32,
            hist_head: (hist_head % HIST_CAP) as u32,
            draws: 0,
        }
    }
}

/// The device buffers of one sampler: its state and its history ring.
pub struct DeviceSampler {
    /// `SampleState` bytes
    state: Tensor,
    /// (HIST_CAP) u32
    hist: Tensor,
}

impl DeviceSampler {
    /// Buffers on `dev` (greedy, empty history, until [`DeviceSampler::reset`]).
    pub fn new(dev: &Device) -> Result<Self> {
        let me = Self {
            state: Tensor::zeros(std::mem::size_of::<SampleState>(), DType::U8, dev)?,
            hist: Tensor::zeros(HIST_CAP, DType::U32, dev)?,
        };
        me.reset(&SamplingParams::default(), 0, &[])?;
        Ok(me)
    }

    /// Starts a generation: settings `p`, the generator at `rng` (`Sampler::rng_state`), and the
    /// tokens so far (their last [`HIST_CAP`] are kept). Synchronous.
    pub fn reset(&self, p: &SamplingParams, rng: u64, history: &[u32]) -> Result<()> {
        let dev = self.state.device();
        let keep = &history[history.len().saturating_sub(HIST_CAP)..];
        let st = SampleState::new(p, rng, keep.len(), keep.len());
        let stream = cuda_device(dev)?.cuda_stream();
        let mut ring = vec![0u32; HIST_CAP];
        ring[..keep.len()].copy_from_slice(keep);
        // SAFETY: the state buffer holds size_of::<SampleState>() bytes and the ring HIST_CAP u32;
        // the stream is synchronised before the host values go out of scope.
        unsafe {
            cu::memcpy_htod_async(dptr(&self.state)?, std::slice::from_ref(&st), stream.cu_stream()).w()?;
            cu::memcpy_htod_async(dptr(&self.hist)?, &ring, stream.cu_stream()).w()?;
        }
        stream.synchronize().w()?;
        Ok(())
    }

    /// The state as the device holds it now (synchronous).
    pub fn state(&self) -> Result<SampleState> {
        let stream = cuda_device(self.state.device())?.cuda_stream();
        let mut st = [SampleState::default()];
        stream.synchronize().w()?;
        // SAFETY: the buffer holds one SampleState; the copy completes before `st` is read.
        unsafe { cu::memcpy_dtoh_async(&mut st, dptr(&self.state)?, stream.cu_stream()) }.w()?;
        stream.synchronize().w()?;
        Ok(st[0])
    }

    /// The launch of the sampling kernel over `logits` (vocab f32, penalised in place), reading the
    /// fed token from `tok` and writing the next one to `tok` and `out` (u32 each; `step` += 1);
    /// `parts` (or 0): the decoder's telemetry partials of `n_layers` layers × `nblk` blocks.
    /// Every pointer must address live device memory of those sizes while the launch runs.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        logits: u64,
        vocab: usize,
        tok: u64,
        step: u64,
        out: u64,
        parts: u64,
        n_layers: usize,
        nblk: usize,
    ) -> Result<Launch> {
        let f = func(cuda_device(self.state.device())?, Module::Sample, "sample_logits")?;
        let params = SampleLogitsParams {
            logits,
            st: dptr(&self.state)?,
            hist: dptr(&self.hist)?,
            tok,
            step,
            out,
            parts,
            V: to_i32(vocab, "device sampler: vocabulary")?,
            n_layers: to_i32(n_layers, "device sampler: layers")?,
            nblk: to_i32(nblk, "device sampler: blocks")?,
        };
        Ok(Launch::new(f, (1, 1, 1), THREADS, 0).label("sample").params(params))
    }

    /// Samples once from `logits` (vocab) f32 on this sampler's device, `fed` being the token just
    /// fed (it joins the history first, as in the decoder). The logits tensor is penalised in
    /// place. Returns the token.
    pub fn sample(&self, logits: &Tensor, fed: u32) -> Result<u32> {
        let dev = self.state.device();
        if logits.dtype() != DType::F32 || logits.rank() != 1 || !logits.device().same_device(dev) {
            return Err(Error::Invalid(format!(
                "device sampler: needs (vocab) f32 logits on its device, got {:?} {:?}",
                logits.dims(),
                logits.dtype()
            )));
        }
        let words = Tensor::from_slice(&[fed, 0, 0], 3, dev)?; // tok, step, out
        let base = dptr(&words)?;
        let l = self.launch(dptr(logits)?, logits.dim(0)?, base, base + 4, base + 8, 0, 0, 0)?;
        let stream = cuda_device(dev)?.cuda_stream();
        // SAFETY: `launch` fills SampleLogitsParams with the contiguous (vocab) f32 logits
        // tensor, this sampler's buffers and the three words of `words`, all alive until the
        // synchronising read below.
        unsafe { l.run(&stream) }?;
        let host: Vec<u32> = words.to_vec1()?;
        Ok(host[0])
    }
}
