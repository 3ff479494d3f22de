//! The selective scan for inference on the CPU: the sequential loop of [`super::scan_cpu`] in
//! f32 (the precision the CUDA kernels keep the state in), with an `exp` the compiler vectorises
//! over the N states of a channel. No autograd: [`super::scan_train::training_scan`] takes it only
//! where no input needs a gradient. `eval`'s scorer and CPU prefill spend most of their time in
//! the scan, and the f64 `exp` of the training op was most of that (one per state, channel and
//! token).
//!
//! Math (SPEC §5 step 7): `h_t = exp(Δ_t·A[i,n])·h_{t−1} + Δ_t·v_t·B_t[n]`, `y_t = Σ_n h_t·C_t[n]`.

use candle_core::{DType, Tensor};

use super::scan::ScanOut;
use super::scan_cpu::{channel_ranges, per_range};
use crate::error::Result;

/// `exp(x)` in f32 within 2 ulp of the exact value for x in [−87, 88] (below: a value under
/// 2⁻¹²⁵ instead of the subnormal or 0; above: clamped near f32::MAX), branch-free so a loop of
/// it vectorises. Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7 polynomial.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so n·LN2_HI is exact for |n| < 2¹⁰
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND; // round(x·log₂e)
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to r⁷, summed as 1 + (r + r²·q) so the rounding of the small
    // terms does not reach the leading ones
    let q = 0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))));
    let p = 1.0 + (r + r * r * q);
    // 2ⁿ from the integer held in t's low mantissa bits
    let e = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((e + 127) as u32) << 23)
}

/// States per channel the unrolled loop is written for; other N take the generic loop.
const N16: usize = 16;

/// One channel's scan over `len` tokens: `h` (N) in and out, y (len) out.
#[allow(clippy::too_many_arguments)]
fn channel(len: usize, di: usize, i: usize, v: &[f32], dl: &[f32], a: &[f32], bc: &[f32], n: usize, h: &mut [f32], y: &mut [f32]) {
    let mut da = [0f32; N16];
    for t in 0..len {
        let (vt, dt) = (v[t * di + i], dl[t * di + i]);
        let (bm, cm) = bc[t * 2 * n..(t + 1) * 2 * n].split_at(n);
        let mut acc = 0f32;
        if n == N16 {
            for k in 0..N16 {
                da[k] = exp_f32(dt * a[k]);
            }
            let dv = dt * vt;
            for k in 0..N16 {
                h[k] = da[k] * h[k] + dv * bm[k];
            }
            for k in 0..N16 {
                acc += h[k] * cm[k];
            }
        } else {
            for k in 0..n {
                h[k] = exp_f32(dt * a[k]) * h[k] + dt * vt * bm[k];
                acc += h[k] * cm[k];
            }
        }
        y[t] = acc;
    }
}

/// Scans a sequence from `h0`, as [`super::scan::selective_scan`] (same shapes), without the
/// per-position norms and without autograd.
pub fn selective_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor) -> Result<ScanOut> {
    let (bn, len, di) = v.dims3()?;
    let n = a.dim(1)?;
    let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (vh, dh, ah) = (host(v)?, host(delta)?, host(a)?);
    let bc = host(&Tensor::cat(&[&b.to_dtype(DType::F32)?, &c.to_dtype(DType::F32)?], 2)?)?; // (B, L, 2N)
    let h0h = host(h0)?; // (B, di, N)
    let ranges = channel_ranges(di, bn * len * di * n);
    // per range: y (B, L, w) and h (B, w, N)
    let parts = per_range(&ranges, |s, e| {
        let w = e - s;
        let mut y = vec![0f32; bn * len * w];
        let mut hs = vec![0f32; bn * w * n];
        let mut yc = vec![0f32; len];
        for bi in 0..bn {
            let (vb, db) = (&vh[bi * len * di..(bi + 1) * len * di], &dh[bi * len * di..(bi + 1) * len * di]);
            let bcb = &bc[bi * len * 2 * n..(bi + 1) * len * 2 * n];
            for i in s..e {
                let h = &mut hs[(bi * w + i - s) * n..(bi * w + i - s + 1) * n];
                h.copy_from_slice(&h0h[(bi * di + i) * n..(bi * di + i + 1) * n]);
                channel(len, di, i, vb, db, &ah[i * n..(i + 1) * n], bcb, n, h, &mut yc);
                for (t, &yt) in yc.iter().enumerate() {
                    y[(bi * len + t) * w + i - s] = yt;
                }
            }
        }
        (y, hs)
    });
    let mut y = vec![0f32; bn * len * di];
    let mut last = vec![0f32; bn * di * n];
    for (&(s, e), (py, ph)) in ranges.iter().zip(&parts) {
        let w = e - s;
        for (row, src) in py.chunks_exact(w).enumerate() {
            y[row * di + s..row * di + e].copy_from_slice(src);
        }
        for bi in 0..bn {
            last[(bi * di + s) * n..(bi * di + e) * n].copy_from_slice(&ph[bi * w * n..(bi + 1) * w * n]);
        }
    }
    let dev = v.device();
    Ok(ScanOut {
        y: Tensor::from_vec(y, (bn, len, di), dev)?,
        h_last: Tensor::from_vec(last, (bn, di, n), dev)?,
        h_norm: None,
    })
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_within_two_ulp() {
        let mut worst = 0i64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp() as f32;
            let ulp = (exp_f32(x).to_bits() as i64 - want.to_bits() as i64).abs();
            worst = worst.max(ulp);
            x += 0.000_37;
        }
        assert!(worst <= 2, "exp_f32 off by {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
