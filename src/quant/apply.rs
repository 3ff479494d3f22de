//! Quantising a loaded model in place, and the quantised linear layer it runs.
//!
//! Every quantised linear keeps its dequantised weight as its dense `weight` (in the model's
//! dtype): the prefill, fine-tuning and `--no-kernels` compute with it (the dequantise-then-
//! matmul twin, exactly the quantised values), while the CPU's forward reads only the packed
//! codes through candle's GGML matmul where the format has one ([`QLinear::matmul`]) and the CUDA
//! decoder reads them through its quantised kernels ([`QLinear::device_parts`]). The dense copy
//! stays while the prefill needs it.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::{Part, QWeight, QuantFormat, QuantSpec};
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::{Mixer, Model};

/// A linear layer's quantised weight and, on the CPU, the GGML matmul over the same codes.
#[derive(Debug, Clone)]
pub struct QLinear {
    pub weight: QWeight,
    ggml: Option<QMatMul>,
    /// The codes (u8) and scales (f16) on a GPU, uploaded by the first decoder that reads them.
    gpu: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl QLinear {
    /// Wraps `weight`; with `ggml`, builds the CPU's GGML matmul where the format maps onto one.
    pub fn new(weight: QWeight, ggml: bool) -> Result<Self> {
        let mm = match weight.ggml_blocks().filter(|_| ggml) {
            Some((dt, bytes)) => {
                let st = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dt)?;
                Some(QMatMul::QTensor(Arc::new(QTensor::new(st, (weight.rows, weight.cols))?)))
            }
            None => None,
        };
        Ok(Self {
            weight,
            ggml: mm,
            gpu: std::sync::OnceLock::new(),
        })
    }

    /// The packed codes as a u8 tensor of `rows · row bytes` and the scales as an f16 tensor, on
    /// `device` (the flat layouts of [`QWeight`]). Kept after the first call for that device, so
    /// every decoder of the model shares one copy.
    pub fn device_parts(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some((c, s)) = self.gpu.get() {
            if c.device().same_device(device) {
                return Ok((c.clone(), s.clone()));
            }
        }
        let w = &self.weight;
        let codes = Tensor::from_slice(&w.data, w.data.len(), device)?;
        let scales = Tensor::from_slice(&w.scales, w.scales.len(), device)?;
        let _ = self.gpu.set((codes.clone(), scales.clone()));
        Ok((codes, scales))
    }

    /// Whether the CPU runs this layer through a GGML matmul.
    pub fn uses_ggml(&self) -> bool {
        self.ggml.is_some()
    }

    /// The dequantised (rows, cols) weight in `dtype` on `device`.
    pub fn dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let w = Tensor::from_vec(self.weight.dequantize(), (self.weight.rows, self.weight.cols), device)?;
        Ok(w.to_dtype(dtype)?)
    }

    /// x (n, cols) on the CPU -> (n, rows) f32 through the GGML matmul (which also rounds x to
    /// 8-bit blocks, as llama.cpp does); `None` where there is none or x is elsewhere.
    pub fn matmul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.ggml {
            Some(mm) if x.device().is_cpu() => Ok(Some(mm.forward(&x.to_dtype(DType::F32)?.contiguous()?)?)),
            _ => Ok(None),
        }
    }
}

/// What [`quantize_model`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantSummary {
    /// Linear layers (and the embedding) now quantised.
    pub linears: usize,
    /// Other tensors quantised and dequantised in place.
    pub in_place: usize,
    /// Bytes of the quantised matrices before (f32 at 4 bytes, bf16 at 2: their dtype) and
    /// after (codes plus scales).
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// Layers on the CPU's GGML matmuls.
    pub ggml: usize,
}

/// The row-major f32 values of a tensor as a (rows, cols) matrix: the first dimension is rows.
pub(crate) fn as_matrix(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let rows = t.dims().first().copied().unwrap_or(1);
    let n = t.elem_count();
    let (rows, cols) = if t.rank() <= 1 { (1, n) } else { (rows, n / rows.max(1)) };
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, rows, cols))
}

/// Quantises `l` (named `name`, e.g. `decoder.layers.0.mixer.in_proj`), unless it already is.
fn quantize_linear(l: &mut Linear, name: &str, spec: &QuantSpec, sum: &mut QuantSummary) -> Result<()> {
    if let Some(q) = &l.quant {
        return check_same(q.weight.format, spec.format, name);
    }
    let (w, rows, cols) = as_matrix(&l.weight)?;
    install(
        l,
        QWeight::quantize(&w, rows, cols, spec.format, &format!("{name}.weight"))?,
        spec,
        sum,
    )
}

/// Puts a quantised weight on `l`: the packed form, and its dequantised values as the dense one.
pub(crate) fn install(l: &mut Linear, q: QWeight, spec: &QuantSpec, sum: &mut QuantSummary) -> Result<()> {
    let q = QLinear::new(q, spec.ggml)?;
    sum.bytes_before += l.weight.elem_count() * l.weight.dtype().size_in_bytes();
    sum.bytes_after += q.weight.data.len() + 2 * q.weight.scales.len();
    sum.ggml += usize::from(q.uses_ggml());
    sum.linears += 1;
    l.weight = q.dense(l.weight.dtype(), l.weight.device())?;
    l.quant = Some(Arc::new(q));
    Ok(())
}

fn check_same(have: QuantFormat, want: QuantFormat, name: &str) -> Result<()> {
    match have == want {
        true => Ok(()),
        false => Err(Error::Invalid(format!(
            "{name} is already quantised as {have}; load it without --quant {want}, or quantise the unquantised model"
        ))),
    }
}

/// Quantises and dequantises a tensor in place (rows = its first dimension).
fn fake_quantize(t: &mut Tensor, name: &str, format: QuantFormat, sum: &mut QuantSummary) -> Result<()> {
    let (w, rows, cols) = as_matrix(t)?;
    let q = QWeight::quantize(&w, rows, cols, format, name)?;
    *t = Tensor::from_vec(q.dequantize(), t.shape(), t.device())?.to_dtype(t.dtype())?;
    sum.in_place += 1;
    Ok(())
}

/// Visits every linear layer of the model with its checkpoint prefix and [`Part`].
pub fn for_each_linear(model: &mut Model, f: &mut dyn FnMut(&str, Part, &mut Linear) -> Result<()>) -> Result<()> {
    for (i, b) in model.layers.iter_mut().enumerate() {
        let p = format!("decoder.layers.{i}.mixer");
        match &mut b.mixer {
            Mixer::Mamba(m) => {
                f(&format!("{p}.in_proj"), Part::InProj, &mut m.in_proj)?;
                f(&format!("{p}.x_proj"), Part::XProj, &mut m.x_proj)?;
                f(&format!("{p}.dt_proj"), Part::DtProj, &mut m.dt_proj)?;
                f(&format!("{p}.out_proj"), Part::OutProj, &mut m.out_proj)?;
            }
            Mixer::Moe(m) => {
                f(&format!("{p}.router"), Part::Router, &mut m.router)?;
                for (e, x) in m.experts.iter_mut().enumerate() {
                    f(&format!("{p}.local_experts.{e}.linear_fc1"), Part::Fc1, &mut x.fc1)?;
                    f(&format!("{p}.local_experts.{e}.linear_fc2"), Part::Fc2, &mut x.fc2)?;
                }
            }
            Mixer::Dense(m) => {
                f(&format!("{p}.linear_fc1"), Part::Fc1, &mut m.fc1)?;
                f(&format!("{p}.linear_fc2"), Part::Fc2, &mut m.fc2)?;
            }
        }
    }
    Ok(())
}

/// The checkpoint name of the embedding (also the tied head).
pub const EMBEDDING: &str = "embedding.word_embeddings";

/// Quantises the parts of `model` that `spec` names (see [`QuantSpec`]); layers that a quantised
/// checkpoint brought already quantised stay as they are if the format agrees.
pub fn quantize_model(model: &mut Model, spec: &QuantSpec) -> Result<QuantSummary> {
    let mut sum = QuantSummary::default();
    for_each_linear(model, &mut |name, part, l| match spec.has(part) {
        true => quantize_linear(l, name, spec, &mut sum),
        false => Ok(()),
    })?;
    if spec.has(Part::Embedding) {
        let mut head = Linear::new(model.embedding.clone(), None);
        head.quant = model.head_quant.clone();
        quantize_linear(&mut head, EMBEDDING, spec, &mut sum)?;
        model.embedding = head.weight;
        model.head_quant = head.quant;
    }
    for (i, b) in model.layers.iter_mut().enumerate() {
        let p = format!("decoder.layers.{i}");
        if spec.has(Part::Norms) {
            fake_quantize(&mut b.norm, &format!("{p}.norm.weight"), spec.format, &mut sum)?;
        }
        if let Mixer::Mamba(m) = &mut b.mixer {
            let parts = [
                (Part::Conv, "conv1d.weight", &mut m.conv_w),
                (Part::ALog, "A_log", &mut m.a_log),
                (Part::D, "D", &mut m.d),
            ];
            for (part, n, t) in parts {
                if spec.has(part) {
                    fake_quantize(t, &format!("{p}.mixer.{n}"), spec.format, &mut sum)?;
                }
            }
        }
    }
    if spec.has(Part::Norms) {
        fake_quantize(&mut model.final_w, "decoder.final_layernorm.weight", spec.format, &mut sum)?;
        fake_quantize(&mut model.final_b, "decoder.final_layernorm.bias", spec.format, &mut sum)?;
    }
    Ok(sum)
}

/// Drops every quantised layer's packed form, keeping its dequantised weight: the model then
/// computes exactly as before on the dense path (fine-tuning starts from it).
pub fn drop_packed(model: &mut Model) -> Result<()> {
    model.head_quant = None;
    for_each_linear(model, &mut |_, _, l| {
        l.quant = None;
        Ok(())
    })
}

/// The format of a quantised model (the first quantised layer's), `None` for a dense one.
pub fn model_format(model: &mut Model) -> Result<Option<QuantFormat>> {
    let mut found = model.head_quant.as_ref().map(|q| q.weight.format);
    for_each_linear(model, &mut |_, _, l| {
        if found.is_none() {
            found = l.quant.as_ref().map(|q| q.weight.format);
        }
        Ok(())
    })?;
    Ok(found)
}

/// [`quantize_model`] on a loaded model, naming the format in its label.
pub fn quantize_loaded(loaded: &mut crate::loader::Loaded, spec: &QuantSpec) -> Result<QuantSummary> {
    let sum = quantize_model(&mut loaded.model, spec)?;
    loaded.label = format!("{} [{}]", loaded.label, spec.format);
    Ok(sum)
}

/// Turns the CPU's GGML matmuls on or off for every quantised layer (off: the dequantise-then-
/// matmul twin; `--no-kernels`).
pub fn set_ggml(model: &mut Model, on: bool) -> Result<()> {
    let redo = |q: &Option<Arc<QLinear>>| -> Result<Option<Arc<QLinear>>> {
        match q {
            Some(q) if q.uses_ggml() != on => Ok(Some(Arc::new(QLinear::new(q.weight.clone(), on)?))),
            other => Ok(other.clone()),
        }
    };
    model.head_quant = redo(&model.head_quant)?;
    for_each_linear(model, &mut |_, _, l| {
        l.quant = redo(&l.quant)?;
        Ok(())
    })
}
