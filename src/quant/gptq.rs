//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", arXiv 2210.17323): the data-aware alternative to round-to-nearest. Each linear's
//! inputs on a calibration text give H = XᵀX; the columns are then quantised one at a time, each
//! rounding error spread over the columns not yet quantised through the upper Cholesky factor of
//! H⁻¹, which minimises the layer's output error ‖X(Ŵ − W)ᵀ‖² greedily. The codes, scales and
//! packing are those of round-to-nearest ([`QWeight`]); q4's group scales are taken when the
//! group's first column is reached, from the weights as updated so far (the reference's
//! `static_groups=False`).
//!
//! Calibration runs the unquantised model once over the text (the tensor-op path, any device),
//! every linear to be quantised adding its inputs' XᵀX ([`Tap`]): memory is cols² f64 per matrix.
//! The embedding (the tied head) stays round-to-nearest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::apply::{as_matrix, for_each_linear, install, quantize_model, QuantSummary};
use super::qweight::scale_for;
use super::{QWeight, QuantFormat, QuantSpec};
use crate::error::{Error, Result};
use crate::model::{Kernels, Logits, Model};

/// The inputs' Gram matrix XᵀX of one linear layer, summed over the calibration tokens.
#[derive(Debug, Clone, Default)]
pub struct Gram {
    pub cols: usize,
    /// (cols, cols) row-major
    pub xtx: Vec<f64>,
    /// Rows of X seen (tokens; for an expert, the tokens routed to it).
    pub n: usize,
}

/// Where a linear layer adds its inputs during calibration (see [`crate::model::linear::Linear`]).
pub type Tap = Arc<Mutex<Gram>>;

/// Adds x (n, cols) to a tap's XᵀX.
pub fn accumulate(tap: &Tap, x: &Tensor) -> Result<()> {
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (n, cols) = x.dims2()?;
    let g: Vec<f32> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
    let mut t = tap
        .lock()
        .map_err(|_| Error::Invalid("GPTQ calibration: a statistics lock was poisoned".into()))?;
    if t.xtx.is_empty() {
        t.cols = cols;
        t.xtx = vec![0.0; cols * cols];
    }
    if t.cols != cols {
        return Err(Error::Invalid(format!(
            "GPTQ calibration: inputs of {cols} columns after {}",
            t.cols
        )));
    }
    for (a, b) in t.xtx.iter_mut().zip(&g) {
        *a += f64::from(*b);
    }
    t.n += n;
    Ok(())
}

/// Runs `model` over `ids` in windows of `window` tokens and returns the XᵀX of every linear
/// layer that `spec` quantises (and that is not quantised yet), by prefix.
pub fn calibrate(model: &Model, spec: &QuantSpec, ids: &[u32], window: usize) -> Result<HashMap<String, Gram>> {
    if ids.is_empty() || window == 0 {
        return Err(Error::Invalid(
            "GPTQ calibration needs a non-empty text and a window of 1 or more".into(),
        ));
    }
    model.check_ids(ids)?;
    let mut m = model.clone();
    m.kernels = Kernels::off();
    m.differentiable = false;
    let mut taps = Vec::new();
    for_each_linear(&mut m, &mut |name, part, l| {
        if spec.has(part) && l.quant.is_none() {
            let t: Tap = Arc::default();
            l.tap = Some(t.clone());
            taps.push((name.to_string(), t));
        }
        Ok(())
    })?;
    for win in ids.chunks(window) {
        let mut st = m.new_state(1)?;
        m.forward(&Tensor::from_slice(win, (1, win.len()), &m.device)?, &mut st, Logits::Last, None)?;
    }
    drop(m);
    let mut out = HashMap::new();
    for (name, t) in taps {
        let g = t
            .lock()
            .map_err(|_| Error::Invalid("GPTQ calibration: a statistics lock was poisoned".into()))?;
        out.insert(name, g.clone());
    }
    Ok(out)
}

/// Lower Cholesky factor of a symmetric positive-definite (n, n) matrix; `None` if it is not.
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let lj = l[j * n..j * n + j].to_vec();
        let d = a[j * n + j] - lj.iter().map(|v| v * v).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let s = a[i * n + j] - l[i * n..i * n + j].iter().zip(&lj).map(|(x, y)| x * y).sum::<f64>();
            l[i * n + j] = s / d;
        }
    }
    Some(l)
}

/// The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), from H's lower factor L: H⁻¹ = L⁻ᵀL⁻¹.
fn inverse_upper_factor(h: &[f64], n: usize) -> Result<Option<Vec<f64>>> {
    let Some(l) = cholesky(h, n) else { return Ok(None) };
    let mut li = vec![0.0; n * n]; // L⁻¹, lower triangular
    for j in 0..n {
        li[j * n + j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| l[i * n + k] * li[k * n + j]).sum();
            li[i * n + j] = -s / l[i * n + i];
        }
    }
    let lt = Tensor::from_vec(li, (n, n), &Device::Cpu)?;
    let hinv: Vec<f64> = lt.t()?.matmul(&lt)?.flatten_all()?.to_vec1()?; // L⁻ᵀL⁻¹
    let Some(lh) = cholesky(&hinv, n) else { return Ok(None) };
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = lh[j * n + i];
        }
    }
    Ok(Some(u))
}

/// GPTQ of a row-major (rows, cols) matrix with its inputs' Gram matrix; `damp` (e.g. 0.01) of
/// the mean diagonal is added to H's diagonal. No calibration rows: round-to-nearest.
pub fn gptq(w: &[f32], rows: usize, cols: usize, format: QuantFormat, gram: &Gram, damp: f64, what: &str) -> Result<QWeight> {
    QWeight::check_shape(format, rows, cols, what)?;
    if gram.n == 0 || gram.cols != cols || w.len() != rows * cols {
        return QWeight::quantize(w, rows, cols, format, what);
    }
    let mut h = gram.xtx.clone();
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0; // an input never seen: its column is quantised as RTN would
        }
    }
    let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        h[i * cols + i] += damp * mean_diag;
    }
    let u = inverse_upper_factor(&h, cols)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{what}: the calibration inputs' XᵀX is not positive definite; raise the damping"
        ))
    })?;
    let mut w: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let g = format.group().unwrap_or(cols);
    let per_row = cols / g;
    let mut scales = vec![f16::ZERO; rows * per_row];
    let mut codes = vec![0u8; rows * cols];
    // lazy batches (the reference's): within a block of BLOCK columns the updates are applied
    // column by column, to the block's later columns only; past the block, once, as one matmul.
    // BLOCK divides every group size, so a group's scale is always taken from updated weights.
    const BLOCK: usize = 32;
    for i1 in (0..cols).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(cols);
        let bw = i2 - i1;
        let mut errs = vec![0f64; rows * bw];
        for i in i1..i2 {
            if i % g == 0 {
                for r in 0..rows {
                    let amax = w[r * cols + i..r * cols + i + g].iter().fold(0f64, |m, v| m.max(v.abs()));
                    scales[r * per_row + i / g] = scale_for(amax as f32, format.qmax(), what)?;
                }
            }
            let d = u[i * cols + i];
            let urow = &u[i * cols + i + 1..i * cols + i2];
            for r in 0..rows {
                let s = scales[r * per_row + i / g].to_f32();
                let x = w[r * cols + i];
                let code = QWeight::encode(format, if s > 0.0 { (x / f64::from(s)) as f32 } else { 0.0 });
                codes[r * cols + i] = code;
                let err = (x - f64::from(QWeight::decode(format, code) * s)) / d;
                errs[r * bw + i - i1] = err;
                for (wj, uj) in w[r * cols + i + 1..r * cols + i2].iter_mut().zip(urow) {
                    *wj -= err * uj;
                }
            }
        }
        if i2 < cols {
            let rest = cols - i2;
            let mut ub = Vec::with_capacity(bw * rest);
            let mut wr = Vec::with_capacity(rows * rest);
            for i in i1..i2 {
                ub.extend_from_slice(&u[i * cols + i2..(i + 1) * cols]);
            }
            for r in 0..rows {
                wr.extend_from_slice(&w[r * cols + i2..(r + 1) * cols]);
            }
            let e = Tensor::from_vec(errs, (rows, bw), &Device::Cpu)?;
            let upd = (Tensor::from_vec(wr, (rows, rest), &Device::Cpu)? - e.matmul(&Tensor::from_vec(ub, (bw, rest), &Device::Cpu)?)?)?;
            let upd: Vec<f64> = upd.flatten_all()?.to_vec1()?;
            for r in 0..rows {
                w[r * cols + i2..(r + 1) * cols].copy_from_slice(&upd[r * rest..(r + 1) * rest]);
            }
        }
    }
    QWeight::from_codes(format, rows, cols, &codes, scales, what)
}

/// ‖X(Ŵ − W)ᵀ‖² / n on the calibration inputs: Σ_r Δ_r (XᵀX) Δ_rᵀ / n (in f64).
pub fn output_error(w: &[f32], q: &QWeight, gram: &Gram) -> Result<f64> {
    let (rows, cols) = (q.rows, q.cols);
    let d: Vec<f64> = q.dequantize().iter().zip(w).map(|(a, b)| f64::from(a - b)).collect();
    let d = Tensor::from_vec(d, (rows, cols), &Device::Cpu)?;
    let h = Tensor::from_slice(&gram.xtx, (cols, cols), &Device::Cpu)?;
    let total = (d.matmul(&h)? * &d)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total / gram.n.max(1) as f64)
}

/// One layer's output error on the calibration text, round-to-nearest against GPTQ.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqLayer {
    pub name: String,
    /// Calibration rows the layer saw.
    pub tokens: usize,
    pub rtn_error: f64,
    pub gptq_error: f64,
}

/// Quantises `model` as `spec` says, its linear layers by GPTQ calibrated on `ids` (the
/// embedding, and layers the text never reached, by round-to-nearest).
pub fn quantize_model_gptq(
    model: &mut Model,
    spec: &QuantSpec,
    ids: &[u32],
    window: usize,
    damp: f64,
) -> Result<(QuantSummary, Vec<GptqLayer>)> {
    let grams = calibrate(model, spec, ids, window)?;
    let mut sum = QuantSummary::default();
    let mut report = Vec::new();
    for_each_linear(model, &mut |name, _, l| {
        let Some(g) = grams.get(name) else { return Ok(()) };
        let (w, rows, cols) = as_matrix(&l.weight)?;
        let what = format!("{name}.weight");
        let q = gptq(&w, rows, cols, spec.format, g, damp, &what)?;
        if g.n > 0 {
            let rtn = QWeight::quantize(&w, rows, cols, spec.format, &what)?;
            report.push(GptqLayer {
                name: name.to_string(),
                tokens: g.n,
                rtn_error: output_error(&w, &rtn, g)?,
                gptq_error: output_error(&w, &q, g)?,
            });
        }
        install(l, q, spec, &mut sum)
    })?;
    let rest = quantize_model(model, spec)?;
    sum.linears += rest.linears;
    sum.in_place += rest.in_place;
    sum.bytes_before += rest.bytes_before;
    sum.bytes_after += rest.bytes_after;
    sum.ggml += rest.ggml;
    Ok((sum, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_upper_factor_multiplies_back() {
        let n = 5;
        // a well-conditioned SPD matrix: AᵀA + n·I
        let a: Vec<f64> = (0..n * n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| a[k * n + i] * a[k * n + j]).sum::<f64>() + if i == j { n as f64 } else { 0.0 };
            }
        }
        let u = inverse_upper_factor(&h, n).unwrap().unwrap();
        // (UᵀU) H = I
        for i in 0..n {
            for j in 0..n {
                let hinv_row: Vec<f64> = (0..n).map(|c| (0..n).map(|k| u[k * n + i] * u[k * n + c]).sum()).collect();
                let v: f64 = (0..n).map(|c| hinv_row[c] * h[c * n + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "({i}, {j}) = {v}");
            }
        }
        assert!(inverse_upper_factor(&vec![0.0; n * n], n).unwrap().is_none());
    }

    #[test]
    fn uncorrelated_inputs_make_gptq_round_to_nearest() {
        // XᵀX = I: no input explains another, so no error is worth spreading
        let cols = 128;
        let w: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 5) as f32)).collect();
        let mut xtx = vec![0.0; cols * cols];
        for i in 0..cols {
            xtx[i * cols + i] = 1.0;
        }
        let g = Gram { cols, xtx, n: 1 };
        for f in [
            QuantFormat::Int8,
            QuantFormat::Fp8,
            QuantFormat::Q4 { group: 64 },
            QuantFormat::Q4 { group: 128 },
        ] {
            assert_eq!(
                gptq(&w, 3, cols, f, &g, 0.01, "w").unwrap(),
                QWeight::quantize(&w, 3, cols, f, "w").unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn correlated_inputs_lower_the_output_error() {
        // inputs with a strong shared component: spreading each column's error pays
        let (rows, cols, n) = (4, 64, 256);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| {
                let (t, c) = (i / cols, i % cols);
                (t as f32 * 0.7).sin() * 2.0 + ((t * 31 + c * 17) % 23) as f32 / 23.0 - 0.5
            })
            .collect();
        let xt = Tensor::from_vec(x, (n, cols), &Device::Cpu).unwrap();
        let tap: Tap = Arc::default();
        accumulate(&tap, &xt).unwrap();
        let g = tap.lock().unwrap().clone();
        assert_eq!(g.n, n);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 0.2).collect();
        for f in [QuantFormat::Int8, QuantFormat::Q4 { group: 64 }] {
            let (q, rtn) = (
                gptq(&w, rows, cols, f, &g, 0.01, "w").unwrap(),
                QWeight::quantize(&w, rows, cols, f, "w").unwrap(),
            );
            let (eq, er) = (output_error(&w, &q, &g).unwrap(), output_error(&w, &rtn, &g).unwrap());
            assert!(eq < er * 0.8, "{f}: GPTQ {eq} vs RTN {er}");
        }
    }
}
