//! Weight tiles as the kernel will stream them, in their [`WeightFormat`] (issue 22): a matrix
//! is stored row after row, each row its values then its scales, so any range of rows (a tile)
//! is one contiguous, self-contained run of `WeightFormat::bytes(rows, cols)` bytes. Rows are
//! the stored layout's: for the split-K matrices (x_proj, out_proj, fc2) the transposed ones.
//!
//! Quantisation is symmetric, one scale per row (int8: max |w| / 127; fp8 e4m3: max |w| / 448;
//! both f32) or per group of a row (4-bit: max |w| / 7 as f16, values −7..7 stored offset by 8,
//! low nibble first). [`roundtrip`] is what the interpreter computes with.

use half::{bf16, f16};

use crate::error::{Error, Result};

use super::isa::WeightFormat;

/// The largest finite e4m3 value.
const FP8_MAX: f32 = 448.0;

/// The value of an e4m3 code (sign, 4 exponent bits of bias 7, 3 mantissa bits; 0x7f / 0xff are
/// NaN; no infinities).
pub fn fp8_value(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((code >> 3) & 15), f32::from(code & 7));
    if code & 0x7f == 0x7f {
        return f32::NAN;
    }
    sign * if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The nearest e4m3 code to `x` (ties to the even code), saturating at ±448.
pub fn fp8_code(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(FP8_MAX);
    if a.is_nan() {
        return 0x7f;
    }
    // the positive codes 0..=0x7e are increasing in value: bisect, then take the nearer side
    let (mut lo, mut hi) = (0u8, 0x7e);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fp8_value(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - fp8_value(lo), fp8_value(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code
}

fn scale_for(amax: f32, top: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / top
    } else {
        0.0
    }
}

fn quant(v: f32, s: f32, top: f32) -> f32 {
    if s > 0.0 {
        (v / s).round().clamp(-top, top)
    } else {
        0.0
    }
}

fn pack_row(row: &[f32], fmt: WeightFormat, out: &mut Vec<u8>) {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    match fmt {
        WeightFormat::F32 => row.iter().for_each(|v| out.extend(v.to_le_bytes())),
        WeightFormat::Bf16 => row.iter().for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        WeightFormat::Int8 => {
            let s = scale_for(amax, 127.0);
            out.extend(row.iter().map(|&v| quant(v, s, 127.0) as i8 as u8));
            out.extend(s.to_le_bytes());
        }
        WeightFormat::Fp8E4m3 => {
            let s = scale_for(amax, FP8_MAX);
            out.extend(row.iter().map(|&v| if s > 0.0 { fp8_code(v / s) } else { 0 }));
            out.extend(s.to_le_bytes());
        }
        WeightFormat::Q4 { group } => {
            let g = group.max(1) as usize;
            let scales: Vec<f16> = row
                .chunks(g)
                .map(|c| f16::from_f32(scale_for(c.iter().fold(0f32, |m, v| m.max(v.abs())), 7.0).min(f16::MAX.to_f32())))
                .collect();
            let nib = |i: usize| row.get(i).map_or(0u8, |&v| (quant(v, scales[i / g].to_f32(), 7.0) + 8.0) as u8);
            out.extend((0..row.len().div_ceil(2)).map(|b| nib(2 * b) | (nib(2 * b + 1) << 4)));
            scales.iter().for_each(|s| out.extend(s.to_le_bytes()));
        }
    }
}

/// A (rows, cols) row-major f32 matrix in `fmt`: `fmt.bytes(rows, cols)` bytes.
pub fn pack(w: &[f32], rows: usize, cols: usize, fmt: WeightFormat) -> Result<Vec<u8>> {
    fmt.check()?;
    if w.len() != rows * cols || cols == 0 {
        return Err(Error::Invalid(format!(
            "megakernel: packing {} values as a {rows} x {cols} matrix",
            w.len()
        )));
    }
    let mut out = Vec::with_capacity(fmt.bytes(rows, cols) as usize);
    w.chunks(cols).for_each(|row| pack_row(row, fmt, &mut out));
    Ok(out)
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The values of `rows` packed rows of `cols` (a whole matrix or any tile of it).
pub fn unpack(bytes: &[u8], rows: usize, cols: usize, fmt: WeightFormat) -> Result<Vec<f32>> {
    fmt.check()?;
    let rb = fmt.bytes(1, cols) as usize;
    if cols == 0 || bytes.len() != rows * rb {
        return Err(Error::Invalid(format!(
            "megakernel: {} bytes are not {rows} rows of {cols} values in {fmt:?} ({rb} bytes a row)",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in bytes.chunks(rb) {
        match fmt {
            WeightFormat::F32 => out.extend((0..cols).map(|i| f32_at(r, 4 * i))),
            WeightFormat::Bf16 => out.extend((0..cols).map(|i| bf16::from_le_bytes([r[2 * i], r[2 * i + 1]]).to_f32())),
            WeightFormat::Int8 => {
                let s = f32_at(r, cols);
                out.extend(r[..cols].iter().map(|&q| f32::from(q as i8) * s));
            }
            WeightFormat::Fp8E4m3 => {
                let s = f32_at(r, cols);
                out.extend(r[..cols].iter().map(|&q| fp8_value(q) * s));
            }
            WeightFormat::Q4 { group } => {
                let g = group as usize;
                let vb = cols.div_ceil(2);
                let s = |i: usize| f16::from_le_bytes([r[vb + 2 * (i / g)], r[vb + 2 * (i / g) + 1]]).to_f32();
                out.extend((0..cols).map(|i| (f32::from((r[i / 2] >> (4 * (i % 2))) & 15) - 8.0) * s(i)));
            }
        }
    }
    Ok(out)
}

/// What the kernel computes with after dequantising `w` stored in `fmt` (f32 is `w` itself).
pub fn roundtrip(w: &[f32], rows: usize, cols: usize, fmt: WeightFormat) -> Result<Vec<f32>> {
    match fmt {
        WeightFormat::F32 => Ok(w.to_vec()),
        _ => unpack(&pack(w, rows, cols, fmt)?, rows, cols, fmt),
    }
}
