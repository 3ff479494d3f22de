//! The selective scan on the GPU: the chunked kernels of `kernels/scan.cu`, parallel over
//! channels and chunks of the sequence, f32 state. [`selective_scan`] has the contract of its twin
//! [`crate::ops::scan::selective_scan`]; the fused Mamba mixer (`model::fused::mamba`) launches
//! the same kernels with its projections' buffers read in place ([`ScanArgs`], [`scan_launch`]).
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, dptr_opt, empty, func, suffix, Launch, Module, ScanIn};
use crate::ops::scan::ScanOut;

/// Chunk length and count of the chunked scan for a sequence of `len` tokens.
pub(crate) fn scan_chunks(len: usize) -> (usize, usize) {
    let lc = len.div_ceil(32).div_ceil(16).clamp(1, 16) * 16;
    (lc, len.div_ceil(lc))
}

/// Inputs of a scan launch, as (pointer, batch stride, time stride) views.
pub(crate) struct ScanArgs {
    pub(crate) dims: ScanIn,
    pub(crate) dt: (u64, usize, usize),
    pub(crate) dt_bias: u64,
    pub(crate) a: u64,
    pub(crate) a_is_log: bool,
    pub(crate) b: u64,
    pub(crate) c: u64,
    pub(crate) bc: (usize, usize),
    pub(crate) v: (u64, usize, usize),
    pub(crate) z: (u64, usize, usize),
    pub(crate) d: u64,
    pub(crate) h0: u64,
}

/// Runs the two chunked-scan kernels. Outputs: y_t (T, gated), y_raw (f32), h_last, telemetry.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_launch(
    dev: &candle_core::Device,
    dtype: DType,
    a: &ScanArgs,
    y_t: Option<&Tensor>,
    y_raw: Option<&Tensor>,
    h_last: Option<&Tensor>,
    hsq: Option<&Tensor>,
    dsum: Option<&Tensor>,
) -> Result<()> {
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    let sfx = suffix(dtype)?;
    let s = a.dims;
    let (bn, q, di, n, lc) = (s.bn as usize, s.q as usize, s.di as usize, s.n as usize, s.lc as usize);
    let grid = (di.div_ceil(128) as u32, q as u32, bn as u32);
    // scratch: per chunk ΣΔ (B, Q, di) and the chunk's own state S (B, Q, di, N)
    let (sum_delta, big_s) = if q > 1 {
        (
            Some(empty(&[bn, q, di], DType::F32, dev)?),
            Some(empty(&[bn, q, di, n], DType::F32, dev)?),
        )
    } else {
        (None, None)
    };
    if let (Some(sd), Some(ss)) = (&sum_delta, &big_s) {
        // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
        unsafe {
            Launch::new(
                func(cd, Module::Scan, &format!("scan_chunk_sum_{sfx}"))?,
                grid,
                128,
                (lc * n * 4) as u32,
            )
            .scan(s)
            .ptr(a.dt.0)
            .i64(a.dt.1)
            .i32(a.dt.2)
            .ptr(a.dt_bias)
            .ptr(a.a)
            .int(i32::from(a.a_is_log))
            .ptr(a.b)
            .i64(a.bc.0)
            .i32(a.bc.1)
            .ptr(a.v.0)
            .i64(a.v.1)
            .i32(a.v.2)
            .ptr(dptr(sd)?)
            .ptr(dptr(ss)?)
            .run(&stream)
        }?;
    }
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe {
        Launch::new(
            func(cd, Module::Scan, &format!("scan_chunk_out_{sfx}"))?,
            grid,
            128,
            ((2 * lc * n + 2 * lc) * 4) as u32,
        )
        .scan(s)
        .ptr(a.dt.0)
        .i64(a.dt.1)
        .i32(a.dt.2)
        .ptr(a.dt_bias)
        .ptr(a.a)
        .int(i32::from(a.a_is_log))
        .ptr(a.b)
        .ptr(a.c)
        .i64(a.bc.0)
        .i32(a.bc.1)
        .ptr(a.v.0)
        .i64(a.v.1)
        .i32(a.v.2)
        .ptr(a.z.0)
        .i64(a.z.1)
        .i32(a.z.2)
        .ptr(a.d)
        .ptr(a.h0)
        .ptr(dptr_opt(sum_delta.as_ref())?)
        .ptr(dptr_opt(big_s.as_ref())?)
        .ptr(dptr_opt(y_t)?)
        .ptr(dptr_opt(y_raw)?)
        .ptr(dptr_opt(h_last)?)
        .ptr(dptr_opt(hsq)?)
        .ptr(dptr_opt(dsum)?)
        .run(&stream)
    }
}

/// The scan's per-token telemetry accumulators (Σh², ΣΔ), (B, L) f32 zeros each, when `want`.
#[allow(clippy::type_complexity)]
pub(crate) fn telemetry_sums(bn: usize, len: usize, want: bool, dev: &candle_core::Device) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !want {
        return Ok((None, None));
    }
    let z = || Tensor::zeros((bn, len), DType::F32, dev);
    Ok((Some(z()?), Some(z()?)))
}

/// The selective scan on f32 tensors by the chunked kernels; same contract as the twin
/// [`crate::ops::scan::selective_scan`] (v, delta (B, L, di); a (di, N); b, c (B, L, N);
/// h0 (B, di, N)). N must be at most 16.
pub fn selective_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor, want_norm: bool) -> Result<ScanOut> {
    let (bn, len, di) = v.dims3()?;
    let n = a.dim(1)?;
    if n > 16 {
        return Err(Error::Invalid(format!("fused scan: state size {n} is over 16")));
    }
    let dev = v.device();
    let (v, delta, a, b, c, h0) = (
        v.contiguous()?,
        delta.contiguous()?,
        a.contiguous()?,
        b.contiguous()?,
        c.contiguous()?,
        h0.contiguous()?,
    );
    let (lc, q) = scan_chunks(len);
    let args = ScanArgs {
        dims: ScanIn {
            bn: bn as i32,
            l: len as i32,
            di: di as i32,
            n: n as i32,
            lc: lc as i32,
            q: q as i32,
        },
        dt: (dptr(&delta)?, len * di, di),
        dt_bias: 0,
        a: dptr(&a)?,
        a_is_log: false,
        b: dptr(&b)?,
        c: dptr(&c)?,
        bc: (len * n, n),
        v: (dptr(&v)?, len * di, di),
        z: (0, 0, 0),
        d: 0,
        h0: dptr(&h0)?,
    };
    let y = empty(&[bn, len, di], DType::F32, dev)?;
    let h_last = empty(&[bn, di, n], DType::F32, dev)?;
    let (hsq, dsum) = telemetry_sums(bn, len, want_norm, dev)?;
    scan_launch(dev, DType::F32, &args, None, Some(&y), Some(&h_last), hsq.as_ref(), dsum.as_ref())?;
    Ok(ScanOut {
        y,
        h_last,
        h_norm: hsq.map(|h| h.sqrt()).transpose()?,
    })
}
