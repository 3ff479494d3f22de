//! The selective scan as an autograd op on the CPU, for fine-tuning there: forward and backward
//! are plain loops, sequential over the sequence and split over channels between threads, and
//! the op keeps only its inputs for the backward pass. The tensor-op twin
//! [`crate::ops::scan::selective_scan`] keeps every intermediate of its ⌈log₂ chunk⌉ rounds
//! (tens of (B, L, d_inner, N) tensors per Mamba layer), which made the CPU training step slow
//! and gigabytes large; `tests/scan_cpu.rs` checks this op against it and against finite
//! differences. The CUDA counterpart is [`crate::ops`]' `scan_grad`.
//!
//! Math per batch row b, channel i and state n (SPEC §5 step 7):
//! `h_t = a_t·h_{t−1} + Δ_t·v_t·B_t[n]` with `a_t = exp(Δ_t·A[i,n])`, `y_t = Σ_n h_t·C_t[n]`.
//! Backward, from `g_t = ∂L/∂y_t` and `r` = the gradient reaching h_t from later steps:
//! `ĝ = g_t·C_t[n] + r`; `∂C_t[n] += g_t·h_t`; `∂Δ_t += ĝ·h_{t−1}·a_t·A + ĝ·v_t·B_t[n]`;
//! `∂A += ĝ·h_{t−1}·a_t·Δ_t`; `∂v_t += ĝ·Δ_t·B_t[n]`; `∂B_t[n] += ĝ·Δ_t·v_t`; `r ← ĝ·a_t`.
//! States and sums are f64 inside the loops; inputs and results are f32.
//!
//! Inputs are packed as the CUDA op packs them (a custom op takes at most three tensors):
//! `vd` = stack([v, Δ], 2) (B, L, 2, d_inner), `bc` = cat([B, C], 2) (B, L, 2N), `a` (d_inner, N).
//! The initial state is a constant of the op (states are never differentiated).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;
use crate::ops::scan::ScanOut;

/// Sizes of one scan.
#[derive(Debug, Clone, Copy)]
struct Dims {
    bn: usize,
    len: usize,
    di: usize,
    n: usize,
}

/// The packed inputs as host slices.
struct Inputs<'a> {
    vd: &'a [f32],
    bc: &'a [f32],
    a: &'a [f32],
    /// (B, d_inner, N), or zeros when None
    h0: Option<&'a [f32]>,
}

impl Inputs<'_> {
    fn v(&self, d: Dims, row: usize, i: usize) -> f32 {
        self.vd[row * 2 * d.di + i]
    }
    fn delta(&self, d: Dims, row: usize, i: usize) -> f32 {
        self.vd[(row * 2 + 1) * d.di + i]
    }
    /// B_t then C_t of one (b, t) row: 2N values
    fn bc_row(&self, d: Dims, row: usize) -> &[f32] {
        &self.bc[row * 2 * d.n..(row + 1) * 2 * d.n]
    }
    fn load_h0(&self, d: Dims, b: usize, i: usize, h: &mut [f64]) {
        match self.h0 {
            Some(h0) => {
                for (dst, &src) in h.iter_mut().zip(&h0[(b * d.di + i) * d.n..(b * d.di + i + 1) * d.n]) {
                    *dst = f64::from(src);
                }
            }
            None => h.fill(0.0),
        }
    }
}

/// Channel ranges, one per thread.
pub(crate) fn channel_ranges(di: usize, work: usize) -> Vec<(usize, usize)> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    // below ~64k state updates a thread costs more than it saves
    let threads = cores.min(di).min(work.div_ceil(1 << 16)).max(1);
    let per = di.div_ceil(threads);
    (0..threads)
        .map(|k| (k * per, ((k + 1) * per).min(di)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Forward over channels `i0..i1`: y (B, L, i1−i0) and h at the last position (B, i1−i0, N).
/// The state and the sums are kept in f64 (plain loops cost the same), so the result is the
/// exact scan of the f32 inputs rounded once.
fn forward_part(d: Dims, x: &Inputs, i0: usize, i1: usize) -> (Vec<f32>, Vec<f32>) {
    let w = i1 - i0;
    let mut y = vec![0f32; d.bn * d.len * w];
    let mut last = vec![0f32; d.bn * w * d.n];
    let mut h = vec![0f64; d.n];
    for b in 0..d.bn {
        for i in i0..i1 {
            x.load_h0(d, b, i, &mut h);
            let arow = &x.a[i * d.n..(i + 1) * d.n];
            for t in 0..d.len {
                let row = b * d.len + t;
                let (v, dl) = (f64::from(x.v(d, row, i)), f64::from(x.delta(d, row, i)));
                let (bm, cm) = x.bc_row(d, row).split_at(d.n);
                let mut acc = 0f64;
                for k in 0..d.n {
                    h[k] = (dl * f64::from(arow[k])).exp() * h[k] + dl * v * f64::from(bm[k]);
                    acc += h[k] * f64::from(cm[k]);
                }
                y[row * w + (i - i0)] = acc as f32;
            }
            for (dst, &src) in last[(b * w + i - i0) * d.n..(b * w + i - i0 + 1) * d.n].iter_mut().zip(&h) {
                *dst = src as f32;
            }
        }
    }
    (y, last)
}

/// Gradients of channels `i0..i1`: (∂v, ∂Δ) (B, L, i1−i0) each, this part's sums into ∂[B, C]
/// (B, L, 2N) and ∂A of its rows ((i1−i0), N).
struct GradPart {
    dv: Vec<f32>,
    ddelta: Vec<f32>,
    dbc: Vec<f64>,
    da: Vec<f64>,
}

fn backward_part(d: Dims, x: &Inputs, gy: &[f32], i0: usize, i1: usize) -> GradPart {
    let (w, n) = (i1 - i0, d.n);
    let mut g = GradPart {
        dv: vec![0f32; d.bn * d.len * w],
        ddelta: vec![0f32; d.bn * d.len * w],
        dbc: vec![0f64; d.bn * d.len * 2 * n],
        da: vec![0f64; w * n],
    };
    // h_t of one channel for every t (h_{−1} in front), recomputed per channel, f64 as forward
    let mut hs = vec![0f64; (d.len + 1) * n];
    let mut r = vec![0f64; n];
    for b in 0..d.bn {
        for i in i0..i1 {
            let arow = &x.a[i * n..(i + 1) * n];
            x.load_h0(d, b, i, &mut hs[..n]);
            for t in 0..d.len {
                let row = b * d.len + t;
                let (v, dl) = (f64::from(x.v(d, row, i)), f64::from(x.delta(d, row, i)));
                let bm = &x.bc_row(d, row)[..n];
                let (prev, cur) = hs.split_at_mut((t + 1) * n);
                let prev = &prev[t * n..];
                for k in 0..n {
                    cur[k] = (dl * f64::from(arow[k])).exp() * prev[k] + dl * v * f64::from(bm[k]);
                }
            }
            r.fill(0.0);
            let da = &mut g.da[(i - i0) * n..(i - i0 + 1) * n];
            for t in (0..d.len).rev() {
                let row = b * d.len + t;
                let (v, dl) = (f64::from(x.v(d, row, i)), f64::from(x.delta(d, row, i)));
                let gt = f64::from(gy[row * d.di + i]);
                let (bm, cm) = x.bc_row(d, row).split_at(n);
                let (hprev, h) = (&hs[t * n..(t + 1) * n], &hs[(t + 1) * n..(t + 2) * n]);
                let dbc = &mut g.dbc[row * 2 * n..(row + 1) * 2 * n];
                let (mut gdl, mut gv) = (0f64, 0f64);
                for k in 0..n {
                    let (ak, bk) = (f64::from(arow[k]), f64::from(bm[k]));
                    let at = (dl * ak).exp();
                    let gh = gt * f64::from(cm[k]) + r[k]; // ∂L/∂h_t
                    dbc[n + k] += gt * h[k]; // ∂C_t
                    let gpa = gh * hprev[k] * at; // through a_t = exp(Δ·A)
                    gdl += gpa * ak + gh * v * bk;
                    da[k] += gpa * dl;
                    gv += gh * dl * bk;
                    dbc[k] += gh * dl * v; // ∂B_t
                    r[k] = gh * at;
                }
                g.dv[row * w + (i - i0)] = gv as f32;
                g.ddelta[row * w + (i - i0)] = gdl as f32;
            }
        }
    }
    g
}

/// The whole forward: y (B, L, d_inner) and the last state (B, d_inner, N).
fn forward(d: Dims, x: &Inputs) -> (Vec<f32>, Vec<f32>) {
    let ranges = channel_ranges(d.di, d.bn * d.len * d.di * d.n);
    let parts = per_range(&ranges, |s, e| forward_part(d, x, s, e));
    let mut y = vec![0f32; d.bn * d.len * d.di];
    let mut last = vec![0f32; d.bn * d.di * d.n];
    for (&(s, e), (py, pl)) in ranges.iter().zip(&parts) {
        let w = e - s;
        for (row, src) in py.chunks_exact(w).enumerate() {
            y[row * d.di + s..row * d.di + e].copy_from_slice(src);
        }
        for b in 0..d.bn {
            last[(b * d.di + s) * d.n..(b * d.di + e) * d.n].copy_from_slice(&pl[b * w * d.n..(b + 1) * w * d.n]);
        }
    }
    (y, last)
}

/// Runs `f` on every channel range, on threads when there is more than one.
pub(crate) fn per_range<T: Send>(ranges: &[(usize, usize)], f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    if ranges.len() == 1 {
        return ranges.iter().map(|&(s, e)| f(s, e)).collect();
    }
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = ranges.iter().map(|&(s, e)| sc.spawn(move || f(s, e))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

struct ScanCpuOp {
    /// (B, d_inner, N) f32 host values, or None for a zero state
    h0: Option<Vec<f32>>,
    dims: Dims,
    /// y when [`selective_scan`] already computed it (with the last state, in one pass); the
    /// forward takes it instead of scanning again.
    ready: std::sync::Mutex<Option<Vec<f32>>>,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("selective-scan (cpu): {what} must be contiguous")
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl CustomOp3 for ScanCpuOp {
    fn name(&self) -> &'static str {
        "selective-scan-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims;
        if let Some(y) = self.ready.lock().ok().and_then(|mut r| r.take()) {
            return Ok((CpuStorage::F32(y), Shape::from((d.bn, d.len, d.di))));
        }
        let x = Inputs {
            vd: slice(s1, l1, "v/Δ")?,
            bc: slice(s2, l2, "B/C")?,
            a: slice(s3, l3, "A")?,
            h0: self.h0.as_deref(),
        };
        let (y, _) = forward(d, &x);
        Ok((CpuStorage::F32(y), Shape::from((d.bn, d.len, d.di))))
    }

    fn bwd(
        &self,
        vd: &Tensor,
        bc: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (vdh, bch, ah, gy) = (host(vd)?, host(bc)?, host(a)?, host(grad)?);
        let x = Inputs {
            vd: &vdh,
            bc: &bch,
            a: &ah,
            h0: self.h0.as_deref(),
        };
        let ranges = channel_ranges(d.di, d.bn * d.len * d.di * d.n);
        let parts = per_range(&ranges, |s, e| backward_part(d, &x, &gy, s, e));
        let mut dvd = vec![0f32; d.bn * d.len * 2 * d.di];
        let mut dbc = vec![0f64; d.bn * d.len * 2 * d.n];
        let mut da = vec![0f32; d.di * d.n];
        for (&(s, e), p) in ranges.iter().zip(&parts) {
            let w = e - s;
            for row in 0..d.bn * d.len {
                dvd[row * 2 * d.di + s..row * 2 * d.di + e].copy_from_slice(&p.dv[row * w..(row + 1) * w]);
                dvd[(row * 2 + 1) * d.di + s..(row * 2 + 1) * d.di + e].copy_from_slice(&p.ddelta[row * w..(row + 1) * w]);
            }
            for (acc, v) in dbc.iter_mut().zip(&p.dbc) {
                *acc += v;
            }
            for (dst, v) in da[s * d.n..e * d.n].iter_mut().zip(&p.da) {
                *dst = *v as f32;
            }
        }
        let dev = vd.device();
        let dbc: Vec<f32> = dbc.into_iter().map(|v| v as f32).collect();
        Ok((
            Some(Tensor::from_vec(dvd, (d.bn, d.len, 2, d.di), dev)?),
            Some(Tensor::from_vec(dbc, (d.bn, d.len, 2 * d.n), dev)?),
            Some(Tensor::from_vec(da, (d.di, d.n), dev)?),
        ))
    }
}

/// The scan of [`crate::ops::scan::selective_scan`] on CPU tensors: y differentiable w.r.t. v,
/// delta, a, b and c through the op above; h_last (and no per-position norms) detached.
pub fn selective_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor) -> Result<ScanOut> {
    let (bn, len, di) = v.dims3()?;
    let n = a.dim(1)?;
    let d = Dims { bn, len, di, n };
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let vd = Tensor::stack(&[&f32c(v)?, &f32c(delta)?], 2)?.contiguous()?; // (B, L, 2, di)
    let bc = Tensor::cat(&[&f32c(b)?, &f32c(c)?], 2)?.contiguous()?; // (B, L, 2N)
    let a = f32c(a)?; // (di, N)
    let h0v = h0.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let h0v = if h0v.iter().all(|&x| x == 0.0) { None } else { Some(h0v) };
    // y and the last state in one pass; the op hands y to autograd
    let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (vdh, bch, ah) = (host(&vd)?, host(&bc)?, host(&a)?);
    let x = Inputs {
        vd: &vdh,
        bc: &bch,
        a: &ah,
        h0: h0v.as_deref(),
    };
    let (y, last) = forward(d, &x);
    let h_last = Tensor::from_vec(last, (bn, di, n), v.device())?;
    let op = ScanCpuOp {
        h0: h0v,
        dims: d,
        ready: std::sync::Mutex::new(Some(y)),
    };
    let y = vd.apply_op3(&bc, &a, op)?;
    Ok(ScanOut { y, h_last, h_norm: None })
}
