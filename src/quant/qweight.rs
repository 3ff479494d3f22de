//! A quantised matrix: round-to-nearest quantisation, the packed codes and scales, dequantisation,
//! and the GGML blocks candle's CPU matmuls take (see the format table in [`crate::quant`]).

use half::f16;

use super::{fp8, QuantFormat};
use crate::error::{Error, Result};

/// A (rows, cols) matrix in a [`QuantFormat`]: `data` holds the codes row-major (int8: one i8
/// per byte; fp8: one E4M3 code per byte; q4: two per byte, element 2k in the low nibble of byte
/// k of its row and 2k+1 in the high one, each stored as q+8), `scales` one `f16` per row (int8,
/// fp8) or per group of a row, row-major (q4: `rows × cols/group`).
#[derive(Debug, Clone, PartialEq)]
pub struct QWeight {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scales: Vec<f16>,
}

/// The scale that maps `amax` onto `qmax` as an `f16`, raised by one `f16` step where rounding
/// made it smaller, so that |w|/s never passes `qmax` (no saturation: the half-step bound holds).
pub(crate) fn scale_for(amax: f32, qmax: f32, what: &str) -> Result<f16> {
    if amax == 0.0 {
        return Ok(f16::ZERO);
    }
    if !amax.is_finite() {
        return Err(Error::Invalid(format!("{what}: holds a non-finite value; check the checkpoint")));
    }
    let mut s = f16::from_f32(amax / qmax);
    for _ in 0..4 {
        if s.is_finite() && s.to_f32() > 0.0 && amax / s.to_f32() <= qmax {
            return Ok(s);
        }
        s = f16::from_bits(s.to_bits() + 1);
    }
    Err(Error::Invalid(format!(
        "{what}: its largest value {amax:e} needs a scale past the f16 range; keep this tensor unquantised (--quant-keep)"
    )))
}

impl QWeight {
    /// Inputs per scale (`cols` for a per-channel format).
    pub fn group_len(&self) -> usize {
        self.format.group().unwrap_or(self.cols)
    }

    /// Bytes of codes per row.
    pub fn row_bytes(format: QuantFormat, cols: usize) -> usize {
        match format {
            QuantFormat::Q4 { .. } => cols / 2,
            _ => cols,
        }
    }

    /// Checks that a (rows, cols) matrix can take `format`; `what` names it in the error.
    pub fn check_shape(format: QuantFormat, rows: usize, cols: usize, what: &str) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(Error::Invalid(format!("{what}: cannot quantise an empty ({rows}, {cols}) matrix")));
        }
        if let Some(g) = format.group() {
            if cols % g != 0 {
                let other = if cols % 64 == 0 { "q4g64, int8 or fp8" } else { "int8 or fp8" };
                return Err(Error::Invalid(format!(
                    "{what}: its rows of {cols} are not a multiple of the {format} group of {g}; use {other}, or keep it (--quant-keep)"
                )));
            }
        }
        Ok(())
    }

    /// Round-to-nearest quantisation of a row-major (rows, cols) f32 matrix; `what` names it in
    /// errors.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: QuantFormat, what: &str) -> Result<Self> {
        Self::check_shape(format, rows, cols, what)?;
        if w.len() != rows * cols {
            return Err(Error::Invalid(format!("{what}: {} values for a ({rows}, {cols}) matrix", w.len())));
        }
        let g = format.group().unwrap_or(cols);
        let qmax = format.qmax();
        let mut scales = Vec::with_capacity(rows * cols / g);
        let mut data = Vec::with_capacity(rows * Self::row_bytes(format, cols));
        for chunk in w.chunks(g) {
            let amax = match chunk.iter().all(|v| v.is_finite()) {
                true => chunk.iter().fold(0f32, |m, v| m.max(v.abs())),
                false => f32::NAN,
            };
            let s = scale_for(amax, qmax, what)?;
            scales.push(s);
            let inv = if s.to_f32() > 0.0 { 1.0 / s.to_f32() } else { 0.0 };
            let code = |v: f32| (v * inv).round().clamp(-qmax, qmax);
            match format {
                QuantFormat::Int8 => data.extend(chunk.iter().map(|&v| code(v) as i8 as u8)),
                QuantFormat::Fp8 => data.extend(chunk.iter().map(|&v| fp8::encode(v * inv))),
                QuantFormat::Q4 { .. } => data.extend(
                    chunk
                        .chunks(2)
                        .map(|p| ((code(p[0]) as i32 + 8) as u8) | (((code(p[1]) as i32 + 8) as u8) << 4)),
                ),
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
            scales,
        })
    }

    /// The stored code of x / s (`x_over_s`): round to nearest, clamped to the format's range
    /// (int8: the i8 byte; fp8: the E4M3 byte; q4: the nibble q+8).
    pub fn encode(format: QuantFormat, x_over_s: f32) -> u8 {
        let qmax = format.qmax();
        match format {
            QuantFormat::Int8 => x_over_s.round().clamp(-qmax, qmax) as i8 as u8,
            QuantFormat::Fp8 => fp8::encode(x_over_s),
            QuantFormat::Q4 { .. } => (x_over_s.round().clamp(-qmax, qmax) as i32 + 8) as u8,
        }
    }

    /// The value of a stored code of [`QWeight::encode`] (before the scale).
    pub fn decode(format: QuantFormat, code: u8) -> f32 {
        match format {
            QuantFormat::Int8 => f32::from(code as i8),
            QuantFormat::Fp8 => fp8::decode(code),
            QuantFormat::Q4 { .. } => f32::from(code) - 8.0,
        }
    }

    /// Packs one stored code per element (row-major, as [`QWeight::encode`] gives them) with
    /// their scales.
    pub fn from_codes(format: QuantFormat, rows: usize, cols: usize, codes: &[u8], scales: Vec<f16>, what: &str) -> Result<Self> {
        let data = match format {
            QuantFormat::Q4 { .. } => codes
                .chunks(2)
                .map(|p| (p[0] & 0x0F) | (p.get(1).copied().unwrap_or(8) << 4))
                .collect(),
            _ => codes.to_vec(),
        };
        Self::from_parts(format, rows, cols, data, scales, what)
    }

    /// Builds from stored codes and scales, checking their lengths; `what` names the tensor.
    pub fn from_parts(format: QuantFormat, rows: usize, cols: usize, data: Vec<u8>, scales: Vec<f16>, what: &str) -> Result<Self> {
        Self::check_shape(format, rows, cols, what)?;
        let (nd, ns) = (rows * Self::row_bytes(format, cols), rows * cols / format.group().unwrap_or(cols));
        if data.len() != nd || scales.len() != ns {
            return Err(Error::Invalid(format!(
                "{what}: {} code bytes and {} scales, expected {nd} and {ns} for a ({rows}, {cols}) {format} matrix; rewrite it with `blackmamba quantize`",
                data.len(),
                scales.len()
            )));
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
            scales,
        })
    }

    /// The integer code of element `i` (row-major): q for int8 and q4; for fp8 the E4M3 value.
    pub fn code(&self, i: usize) -> f32 {
        match self.format {
            QuantFormat::Int8 => f32::from(self.data[i] as i8),
            QuantFormat::Fp8 => fp8::decode(self.data[i]),
            QuantFormat::Q4 { .. } => {
                let b = self.data[i / 2];
                let nib = if i % 2 == 0 { b & 0x0F } else { b >> 4 };
                f32::from(nib) - 8.0
            }
        }
    }

    /// The scale of element `i` (row-major).
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i / self.group_len()].to_f32()
    }

    /// The dequantised matrix, row-major: s·q in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols).map(|i| self.scale(i) * self.code(i)).collect()
    }

    /// The largest error round-to-nearest can leave at element `i`: half a step (s/2; fp8: half
    /// the E4M3 spacing next to the code, times s).
    pub fn half_step(&self, i: usize) -> f32 {
        match self.format {
            QuantFormat::Fp8 => self.scale(i) * fp8::spacing(self.data[i]) / 2.0,
            _ => self.scale(i) / 2.0,
        }
    }

    /// The matrix as the raw bytes of a GGML tensor with exactly these codes and scales: int8 as
    /// `Q8_0` blocks, q4 as `Q4_0` blocks (32 elements each: an f16 scale, then the codes; Q4_0
    /// puts element j in the low nibble of byte j and j+16 in the high one). `None` for fp8 or
    /// rows not a multiple of 32.
    pub fn ggml_blocks(&self) -> Option<(candle_core::quantized::GgmlDType, Vec<u8>)> {
        use candle_core::quantized::GgmlDType;
        if self.cols % 32 != 0 {
            return None;
        }
        let n = self.rows * self.cols;
        match self.format {
            QuantFormat::Fp8 => None,
            QuantFormat::Int8 => {
                let mut out = Vec::with_capacity(n / 32 * 34);
                for b in 0..n / 32 {
                    out.extend(self.scales[b * 32 / self.cols].to_le_bytes());
                    out.extend(&self.data[b * 32..b * 32 + 32]);
                }
                Some((GgmlDType::Q8_0, out))
            }
            QuantFormat::Q4 { .. } => {
                let mut out = Vec::with_capacity(n / 32 * 18);
                for b in 0..n / 32 {
                    out.extend(self.scales[b * 32 / self.group_len()].to_le_bytes());
                    let nib = |i: usize| (self.code(b * 32 + i) + 8.0) as u8;
                    out.extend((0..16).map(|j| nib(j) | (nib(j + 16) << 4)));
                }
                Some((GgmlDType::Q4_0, out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        // a deterministic spread of magnitudes, with an outlier per row
        (0..rows * cols)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if i % cols == 7 {
                    x * 40.0
                } else {
                    x * (1.0 + (i / cols) as f32)
                }
            })
            .collect()
    }

    fn formats() -> [QuantFormat; 4] {
        [
            QuantFormat::Int8,
            QuantFormat::Fp8,
            QuantFormat::Q4 { group: 64 },
            QuantFormat::Q4 { group: 128 },
        ]
    }

    #[test]
    fn round_trip_within_half_a_step() {
        let (rows, cols) = (6, 256);
        let w = matrix(rows, cols, 3);
        for f in formats() {
            let q = QWeight::quantize(&w, rows, cols, f, "t").unwrap();
            assert_eq!(q.data.len(), rows * QWeight::row_bytes(f, cols));
            assert_eq!(q.scales.len(), rows * cols / q.group_len());
            let d = q.dequantize();
            let mut worst = 0f32;
            for i in 0..w.len() {
                let err = (d[i] - w[i]).abs();
                // the bound itself, plus the f32 rounding of w/s and s·q
                assert!(
                    err <= q.half_step(i) * (1.0 + 1e-5) + w[i].abs() * 1e-6,
                    "{f} elem {i}: {} vs {} (half step {})",
                    d[i],
                    w[i],
                    q.half_step(i)
                );
                worst = worst.max(err / q.scale(i));
            }
            // the largest |w| of each group maps onto the largest code (up to the scale's f16 rounding)
            for g in 0..q.scales.len() {
                let n = q.group_len();
                let amax = w[g * n..(g + 1) * n].iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(amax / q.scales[g].to_f32() > f.qmax() * 0.998, "{f} group {g}");
            }
            assert!(worst > 0.0, "{f}: nothing was rounded, the test data is too easy");
        }
    }

    #[test]
    fn q4_packing_order_low_nibble_first() {
        // codes -7..7 as w = s·q with s = 1 exactly: the largest |w| (7) gives s = 1
        let cols = 64;
        let w: Vec<f32> = (0..cols).map(|i| (i as f32 % 15.0) - 7.0).collect();
        let q = QWeight::quantize(&w, 1, cols, QuantFormat::Q4 { group: 64 }, "t").unwrap();
        assert_eq!(q.scales, vec![f16::ONE]);
        // byte 0: element 0 (-7 → 1) low, element 1 (-6 → 2) high
        assert_eq!(q.data[0], 0x21);
        assert_eq!(q.data[1], 0x43);
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn int8_codes_and_zero_rows() {
        let w = [127.0, -63.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let q = QWeight::quantize(&w, 2, 4, QuantFormat::Int8, "t").unwrap();
        assert_eq!(q.scales, vec![f16::ONE, f16::ZERO]);
        assert_eq!(q.data[..4], [127u8, (-64i8) as u8, 0, 1]); // -63.5 rounds away from zero
        assert_eq!(q.dequantize()[4..], [0.0; 4]);
    }

    #[test]
    fn ggml_blocks_dequantise_to_the_same_values() {
        use candle_core::quantized::{QStorage, QTensor};
        let (rows, cols) = (4, 256);
        let w = matrix(rows, cols, 11);
        for f in [QuantFormat::Int8, QuantFormat::Q4 { group: 64 }, QuantFormat::Q4 { group: 128 }] {
            let q = QWeight::quantize(&w, rows, cols, f, "t").unwrap();
            let (dt, bytes) = q.ggml_blocks().unwrap();
            let dev = candle_core::Device::Cpu;
            let st = QStorage::from_data(std::borrow::Cow::Owned(bytes), &dev, dt).unwrap();
            let qt = QTensor::new(st, (rows, cols)).unwrap();
            let d: Vec<f32> = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(d, q.dequantize(), "{f}");
        }
        assert!(QWeight::quantize(&w, rows, cols, QuantFormat::Fp8, "t")
            .unwrap()
            .ggml_blocks()
            .is_none());
    }

    #[test]
    fn bad_inputs_are_one_line_errors() {
        let w = vec![0.5f32; 2 * 96];
        let e = QWeight::quantize(&w, 2, 96, QuantFormat::Q4 { group: 64 }, "x_proj.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x_proj.weight") && e.contains("group of 64") && !e.contains('\n'), "{e}");
        let e = "q4g32".parse::<QuantFormat>().unwrap_err().to_string();
        assert!(e.contains("q4g64 or q4g128") && !e.contains('\n'), "{e}");
        assert!("int4".parse::<QuantFormat>().unwrap_err().to_string().contains("--quant int4"));
        let e = QWeight::quantize(&[1.0, f32::NAN], 1, 2, QuantFormat::Int8, "w")
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite"), "{e}");
        let e = QWeight::quantize(&[1e9, 1.0], 1, 2, QuantFormat::Int8, "w")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f16 range"), "{e}");
        let e = QWeight::from_parts(QuantFormat::Int8, 2, 4, vec![0; 7], vec![f16::ONE; 2], "w")
            .unwrap_err()
            .to_string();
        assert!(e.contains("7 code bytes") && !e.contains('\n'), "{e}");
        assert_eq!("q4".parse::<QuantFormat>().unwrap(), QuantFormat::Q4 { group: 64 });
    }
}
