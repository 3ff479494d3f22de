//! The decoder's packed weights (`--quant`): which matrices its quantised kernels read
//! (`kernels/qgemv.cu`: the decode kernel bodies instantiated per format), their device pointers,
//! the kernel names and the params fields they fill, and the bytes a step reads.
//!
//! A quantised linear (in_proj, x_proj, out_proj, the experts' fc1/fc2, the embedding and tied
//! head) is read packed when [`DecodeOpts::packed`](super::DecodeOpts) is on: its codes and f16
//! scales are uploaded once per model ([`QLinear::device_parts`]) and the kernel
//! `{fmt}_{name}_{dtype}` takes the params struct of the dense one with the dense pointer null
//! ([`WRef::rows`]) and the matrix in its `q` ([`WRef::packed`]: the codes, the scales, the
//! experts' scales table and the q4 group's log2). Every other matrix (and a quantised dt_proj or
//! router, which the decoder reads inside other kernels) is read dense.

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::{Device, Tensor};

use super::Decoder;
use crate::error::Result;
use crate::model::linear::Linear;
use crate::ops::cuda::{func, suffix, Module};
use crate::ops::params::PackedRows;
use crate::quant::{QLinear, QWeight, QuantFormat};

/// A packed matrix's scales and format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct QRef {
    pub scales: u64,
    pub format: QuantFormat,
}

/// A weight matrix as a decode kernel reads it: `p` is the dense rows in the model's dtype, or the
/// packed codes when `q` is set. For an expert table `p` is 0 and the tables hold the pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct WRef {
    pub p: u64,
    pub q: Option<QRef>,
}

/// The name of a format in the quantised kernels' names.
pub(super) fn kernel_format(f: QuantFormat) -> &'static str {
    match f {
        QuantFormat::Int8 => "int8",
        QuantFormat::Fp8 => "fp8",
        QuantFormat::Q4 { .. } => "q4",
    }
}

/// log2 of the q4 group (0 for a per-row format), the kernels' `gshift`.
pub(super) fn group_shift(f: QuantFormat) -> i32 {
    f.group().map_or(0, |g| g.trailing_zeros() as i32)
}

/// The packed form of a matrix the decoder may read, `None` where it reads the dense one
/// (`packed` off, no quantised form, or one of another shape than the dense weight).
pub(super) fn packed_of<'a>(dense: &Tensor, quant: Option<&'a QLinear>, packed: bool) -> Option<&'a QLinear> {
    let q = quant.filter(|_| packed)?;
    let fits = dense.dims() == [q.weight.rows, q.weight.cols] && q.weight.format.group().is_none_or(|g| g.is_power_of_two());
    fits.then_some(q)
}

/// The matrix `dense` (or its packed form, see [`packed_of`]) on the device; `keep` holds a
/// tensor for the decoder's lifetime and gives its address.
pub(super) fn weight_ref(
    dense: &Tensor,
    quant: Option<&QLinear>,
    device: &Device,
    packed: bool,
    keep: &mut impl FnMut(&Tensor) -> Result<u64>,
) -> Result<WRef> {
    match packed_of(dense, quant, packed) {
        Some(q) => {
            let (codes, scales) = q.device_parts(device)?;
            Ok(WRef {
                p: keep(&codes)?,
                q: Some(QRef {
                    scales: keep(&scales)?,
                    format: q.weight.format,
                }),
            })
        }
        None => Ok(WRef { p: keep(dense)?, q: None }),
    }
}

/// [`weight_ref`] of a linear layer.
pub(super) fn linear_ref(l: &Linear, device: &Device, packed: bool, keep: &mut impl FnMut(&Tensor) -> Result<u64>) -> Result<WRef> {
    weight_ref(&l.weight, l.quant.as_deref(), device, packed, keep)
}

/// The one packed format of a list of linears (an MoE layer's fc1 or fc2 over its experts):
/// `Some` only where every one of them is read packed in the same format.
pub(super) fn common_format<'a>(ls: impl Iterator<Item = &'a Linear>, packed: bool) -> Option<QuantFormat> {
    let mut found: Option<QuantFormat> = None;
    for l in ls {
        let f = packed_of(&l.weight, l.quant.as_deref(), packed)?.weight.format;
        if found.is_some_and(|g| g != f) {
            return None;
        }
        found = Some(f);
    }
    found
}

/// Bytes of a (rows, cols) matrix as the decoder reads it: packed (codes + f16 scales) or dense
/// at `es` bytes an element.
pub(super) fn matrix_bytes(dense: &Tensor, quant: Option<&QLinear>, packed: bool, es: usize) -> usize {
    match packed_of(dense, quant, packed) {
        Some(q) => q.weight.data.len() + 2 * q.weight.scales.len(),
        None => dense.elem_count() * es,
    }
}

/// Bytes of one row of a matrix (the embedding row a step reads).
pub(super) fn row_bytes(dense: &Tensor, quant: Option<&QLinear>, packed: bool, es: usize) -> usize {
    match packed_of(dense, quant, packed) {
        Some(q) => {
            let w = &q.weight;
            QWeight::row_bytes(w.format, w.cols) + 2 * w.cols / w.group_len()
        }
        None => dense.dims().last().copied().unwrap_or(0) * es,
    }
}

impl WRef {
    /// The `vec` argument of a kernel reading rows of `k` inputs: 16-byte loads of the rows
    /// (dense: rows of `k · es` bytes; packed: rows of codes) where they stay 16-byte aligned.
    pub fn vec(&self, k: usize, es: usize) -> i32 {
        let row = match self.q {
            Some(q) => QWeight::row_bytes(q.format, k),
            None => k * es,
        };
        i32::from(row % 16 == 0)
    }

    /// The dense pointer of a launch's params (`W`, `emb`, `E`): the rows, 0 where packed (the
    /// quantised kernels read [`WRef::packed`] instead) or for an expert table.
    pub fn rows(&self) -> u64 {
        match self.q {
            Some(_) => 0,
            None => self.p,
        }
    }

    /// The `q` of a launch's params: the codes, scales and q4 group of a packed matrix, with
    /// `stab` the experts' scales table beside the codes table (0 outside the MoE launches); all
    /// zero for a dense matrix.
    pub fn packed(&self, stab: u64) -> PackedRows {
        match self.q {
            Some(q) => PackedRows {
                codes: self.p,
                scales: q.scales,
                stab,
                gshift: group_shift(q.format),
            },
            None => PackedRows::default(),
        }
    }
}

impl Decoder {
    /// The kernel `name` (e.g. `in_proj_conv`) for the model's dtype reading `w`: the dense one of
    /// `kernels/decode.cu`, or the format's of `kernels/qgemv.cu`.
    pub(super) fn weight_func(&self, name: &str, w: &WRef) -> Result<CudaFunction> {
        let sfx = suffix(self.dtype)?;
        match w.q {
            Some(q) => func(&self.dev, Module::Qgemv, &format!("{}_{name}_{sfx}", kernel_format(q.format))),
            None => func(&self.dev, Module::Decode, &format!("{name}_{sfx}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn qlinear(rows: usize, cols: usize, f: QuantFormat) -> QLinear {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        QLinear::new(QWeight::quantize(&w, rows, cols, f, "t").unwrap(), false).unwrap()
    }

    #[test]
    fn packed_only_when_on_and_the_shapes_agree() {
        let dense = Tensor::zeros((8, 128), DType::F32, &Device::Cpu).unwrap();
        let q = qlinear(8, 128, QuantFormat::Q4 { group: 64 });
        assert!(packed_of(&dense, Some(&q), true).is_some());
        assert!(packed_of(&dense, Some(&q), false).is_none());
        assert!(packed_of(&dense, None, true).is_none());
        let other = Tensor::zeros((128, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(packed_of(&other, Some(&q), true).is_none());
    }

    #[test]
    fn bytes_count_codes_and_scales() {
        let dense = Tensor::zeros((8, 128), DType::BF16, &Device::Cpu).unwrap();
        for (f, codes, scales) in [
            (QuantFormat::Int8, 8 * 128, 8),
            (QuantFormat::Fp8, 8 * 128, 8),
            (QuantFormat::Q4 { group: 64 }, 8 * 64, 8 * 2),
            (QuantFormat::Q4 { group: 128 }, 8 * 64, 8),
        ] {
            let q = qlinear(8, 128, f);
            assert_eq!(matrix_bytes(&dense, Some(&q), true, 2), codes + 2 * scales, "{f}");
            assert_eq!(row_bytes(&dense, Some(&q), true, 2), (codes + 2 * scales) / 8, "{f}");
            assert_eq!(matrix_bytes(&dense, Some(&q), false, 2), 8 * 128 * 2, "{f}");
        }
        assert_eq!(row_bytes(&dense, None, true, 2), 256);
    }

    #[test]
    fn kernel_names_group_shifts_and_vector_loads() {
        assert_eq!(kernel_format(QuantFormat::Q4 { group: 128 }), "q4");
        assert_eq!(group_shift(QuantFormat::Q4 { group: 64 }), 6);
        assert_eq!(group_shift(QuantFormat::Q4 { group: 128 }), 7);
        assert_eq!(group_shift(QuantFormat::Int8), 0);
        let q = |format| WRef {
            p: 0,
            q: Some(QRef { scales: 0, format }),
        };
        // int8 rows of 40 codes are not 16-byte multiples; bf16 rows of 40 are (80 bytes)
        assert_eq!(q(QuantFormat::Int8).vec(40, 2), 0);
        assert_eq!(WRef { p: 0, q: None }.vec(40, 2), 1);
        assert_eq!(q(QuantFormat::Fp8).vec(48, 2), 1);
        assert_eq!(q(QuantFormat::Q4 { group: 64 }).vec(64, 2), 1);
        let mixed = [
            Linear::new(Tensor::zeros((8, 128), DType::F32, &Device::Cpu).unwrap(), None),
            Linear::new(Tensor::zeros((8, 128), DType::F32, &Device::Cpu).unwrap(), None),
        ];
        assert_eq!(common_format(mixed.iter(), true), None);
        let mut both = mixed.clone();
        for l in &mut both {
            l.quant = Some(std::sync::Arc::new(qlinear(8, 128, QuantFormat::Int8)));
        }
        assert_eq!(common_format(both.iter(), true), Some(QuantFormat::Int8));
        assert_eq!(common_format(both.iter(), false), None);
        both[1].quant = Some(std::sync::Arc::new(qlinear(8, 128, QuantFormat::Fp8)));
        assert_eq!(common_format(both.iter(), true), None);
    }

    #[test]
    fn params_fields_of_dense_and_packed_matrices() {
        let dense = WRef { p: 0x1000, q: None };
        assert_eq!(dense.rows(), 0x1000);
        assert_eq!(dense.packed(0x3000), PackedRows::default());
        let q4 = WRef {
            p: 0x1000,
            q: Some(QRef {
                scales: 0x2000,
                format: QuantFormat::Q4 { group: 128 },
            }),
        };
        assert_eq!(q4.rows(), 0);
        let want = PackedRows {
            codes: 0x1000,
            scales: 0x2000,
            stab: 0x3000,
            gshift: 7,
        };
        assert_eq!(q4.packed(0x3000), want);
    }
}
