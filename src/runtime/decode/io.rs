//! The decoder's state and results on the host side: loading and reading the recurrent state,
//! the last logits, the telemetry words, and the bytes a step reads.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::result as cu;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};

use super::{unsupported, Decoder};
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::probe::{MambaRecord, MoeRecord, Probe};
use crate::model::state::{LayerState, State};
use crate::model::{Mixer, Model};
use crate::ops::cuda::dptr;

impl Decoder {
    /// Copies a batch-1 model state into the decoder's state buffers.
    pub fn load_state(&mut self, st: &State) -> Result<()> {
        if st.batch != 1 {
            return Err(unsupported("a state of batch other than 1"));
        }
        let s = self.sizes;
        for (slot, l) in st.layers.iter().flatten().enumerate() {
            let conv = l.conv.to_dtype(DType::F32)?.contiguous()?;
            let ssm = l.ssm.to_dtype(DType::F32)?.contiguous()?;
            if conv.elem_count() != s.di * s.k || ssm.elem_count() != s.di * s.n || slot >= self.mamba_idx.len() {
                return Err(Error::Invalid("fast decode: the state does not match the model".into()));
            }
            let dst_c = self.bufs.conv + (slot * s.di * s.k * 4) as u64;
            let dst_s = self.bufs.ssm + (slot * s.di * s.n * 4) as u64;
            // SAFETY: both ranges lie inside the decoder's state buffers and the tensors.
            unsafe {
                cu::memcpy_dtod_async(dst_c, dptr(&conv)?, s.di * s.k * 4, self.stream.cu_stream()).w()?;
                cu::memcpy_dtod_async(dst_s, dptr(&ssm)?, s.di * s.n * 4, self.stream.cu_stream()).w()?;
            }
            self.stream.synchronize().w()?;
        }
        Ok(())
    }

    /// The decoder's state as a model [`State`] (copies), at position `pos`.
    pub fn state(&self, model: &Model, pos: usize) -> Result<State> {
        let s = self.sizes;
        let mut st = model.new_state(1)?;
        for (slot, l) in st.layers.iter_mut().flatten().enumerate() {
            let conv = Tensor::zeros((1, s.di, s.k), DType::F32, &model.device)?;
            let ssm = Tensor::zeros((1, s.di, s.n), DType::F32, &model.device)?;
            // SAFETY: as in load_state, the other way round.
            unsafe {
                cu::memcpy_dtod_async(
                    dptr(&conv)?,
                    self.bufs.conv + (slot * s.di * s.k * 4) as u64,
                    s.di * s.k * 4,
                    self.stream.cu_stream(),
                )
                .w()?;
                cu::memcpy_dtod_async(
                    dptr(&ssm)?,
                    self.bufs.ssm + (slot * s.di * s.n * 4) as u64,
                    s.di * s.n * 4,
                    self.stream.cu_stream(),
                )
                .w()?;
            }
            *l = LayerState { conv, ssm };
        }
        self.stream.synchronize().w()?;
        st.pos = pos;
        Ok(st)
    }

    /// The logits of the last step (f32, vocab), copied to the host.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.sizes.vocab];
        self.stream.synchronize().w()?;
        // SAFETY: v has vocab f32; the logits buffer too.
        unsafe { cu::memcpy_dtoh_async(&mut v, self.bufs.logits, self.stream.cu_stream()) }.w()?;
        self.stream.synchronize().w()?;
        Ok(v)
    }

    /// Appends the telemetry of the last step that wrote `slot` to `probe` (probe option on).
    pub fn record_probe(&self, slot: usize, probe: &mut Probe) -> Result<()> {
        if !self.opts.probe {
            return Err(Error::Invalid("fast decode: built without the probe".into()));
        }
        let words = self.host.slice(slot * self.n_words, self.n_words);
        let f = |i: usize| f32::from_bits(words.get(i).copied().unwrap_or(0));
        if probe.mamba.is_empty() && probe.moe.is_empty() {
            for &i in &self.mamba_idx {
                probe.mamba.push(MambaRecord {
                    layer: i,
                    ..Default::default()
                });
            }
            for &(i, e) in &self.moe_idx {
                probe.moe.push(MoeRecord {
                    layer: i,
                    n_experts: e,
                    ..Default::default()
                });
            }
        }
        probe.n_tokens += 1;
        for (j, rec) in probe.mamba.iter_mut().enumerate() {
            let o = 1 + 3 * j;
            rec.ssm_norm.push(f(o).max(0.0).sqrt());
            rec.conv_norm.push(f(o + 1).max(0.0).sqrt());
            rec.mean_delta.push(f(o + 2) / self.sizes.di as f32);
        }
        let mut o = 1 + 3 * self.mamba_idx.len();
        for (rec, &(_, e)) in probe.moe.iter_mut().zip(&self.moe_idx) {
            for x in 0..e {
                rec.logits.push(f(o + x));
            }
            rec.experts.push(f(o + e) as u32);
            o += e + 1;
        }
        Ok(())
    }

    /// Bytes the step must read from device memory at least (weights it touches once, the state
    /// read and written): the numerator of achieved bandwidth. Quantised linears count as their
    /// codes and scales, which the decoder reads ([`super::DecodeOpts::packed`], the default);
    /// [`Decoder::dense_bytes_per_token`] is the same step over the dense copies.
    pub fn bytes_per_token(model: &Model) -> usize {
        Self::step_bytes(model, true)
    }

    /// [`Decoder::bytes_per_token`] with every matrix read dense (`Model::step`, the decoder with
    /// `packed` off, or an unquantised model).
    pub fn dense_bytes_per_token(model: &Model) -> usize {
        Self::step_bytes(model, false)
    }

    fn step_bytes(model: &Model, packed: bool) -> usize {
        use super::quant::{matrix_bytes, row_bytes};
        let cfg = &model.cfg;
        let es = model.dtype.size_in_bytes();
        let (d, di, n, k) = (cfg.hidden_size, cfg.d_inner(), cfg.state_size, cfg.conv_dimension);
        let lin = |l: &Linear| matrix_bytes(&l.weight, l.quant.as_deref(), packed, es);
        let q = model.head_quant.as_deref();
        // head, the embedding row, the final norm
        let mut bytes = matrix_bytes(&model.embedding, q, packed, es) + row_bytes(&model.embedding, q, packed, es) + 2 * d * 4;
        for l in &model.layers {
            bytes += d * 4; // norm
            match &l.mixer {
                Mixer::Mamba(m) => {
                    bytes += lin(&m.in_proj) + lin(&m.x_proj) + lin(&m.out_proj); // matrices
                    bytes += m.dt_proj.weight.elem_count() * es; // read dense inside the SSM step
                    bytes += (di * k + di + di + di * n + di) * 4; // conv w/b, dt bias, A_log, D
                    bytes += 2 * (di * k + di * n) * 4; // state read + written
                }
                Mixer::Moe(m) => {
                    let e = m.experts.len();
                    // the router, then one expert (packed only where all are, as the decoder reads them)
                    bytes += e * d * 4 + e * 4;
                    for fc1 in [true, false] {
                        let ls: Vec<&Linear> = m.experts.iter().map(|x| if fc1 { &x.fc1 } else { &x.fc2 }).collect();
                        let on = super::quant::common_format(ls.iter().copied(), packed).is_some();
                        bytes += ls.first().map_or(0, |l| matrix_bytes(&l.weight, l.quant.as_deref(), on, es));
                    }
                }
                Mixer::Dense(m) => bytes += lin(&m.fc1) + lin(&m.fc2),
            }
        }
        bytes
    }
}
