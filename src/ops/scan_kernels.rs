//! The selective scan on the GPU: the chunked kernels of `kernels/scan.cu`, parallel over
//! channels and chunks of the sequence, f32 state. [`selective_scan`] has the contract of its twin
//! [`crate::ops::scan::selective_scan`]; the fused Mamba mixer (`model::fused::mamba`) launches
//! the same kernels with its projections' buffers read in place ([`ScanArgs`], [`scan_launch`]).
#![allow(unsafe_code)]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, dptr_opt, empty, func, suffix, Launch, Module};
use crate::ops::params::{to_i32, to_i64, ScanChunkOutParams, ScanChunkSumParams, ScanIn};
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

impl ScanArgs {
    /// `scan_chunk_sum_T`'s params, writing ΣΔ to `sum_delta` (B, Q, di) and the chunks' own
    /// states to `sst` (B, Q, di, N).
    pub(crate) fn chunk_sum_params(&self, sum_delta: u64, sst: u64) -> Result<ScanChunkSumParams> {
        Ok(ScanChunkSumParams {
            dt: self.dt.0,
            dt_bias: self.dt_bias,
            A: self.a,
            Bm: self.b,
            v: self.v.0,
            sum_delta,
            Sst: sst,
            dt_bs: to_i64(self.dt.1, "scan: dt batch stride")?,
            bc_bs: to_i64(self.bc.0, "scan: B/C batch stride")?,
            v_bs: to_i64(self.v.1, "scan: v batch stride")?,
            s: self.dims,
            dt_ts: to_i32(self.dt.2, "scan: dt row stride")?,
            a_is_log: i32::from(self.a_is_log),
            bc_ts: to_i32(self.bc.1, "scan: B/C row stride")?,
            v_ts: to_i32(self.v.2, "scan: v row stride")?,
        })
    }

    /// `scan_chunk_out_T`'s params with the scratch of [`ScanArgs::chunk_sum_params`] and the
    /// outputs (0 for one not wanted): y_t (B, L, di) gated in T, y_raw (B, L, di) f32, h_last
    /// (B, di, N) f32, hsq and dsum (B, L) f32 telemetry.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn chunk_out_params(
        &self,
        sum_delta: u64,
        sst: u64,
        y_t: u64,
        y_raw: u64,
        h_last: u64,
        hsq: u64,
        dsum: u64,
    ) -> Result<ScanChunkOutParams> {
        Ok(ScanChunkOutParams {
            dt: self.dt.0,
            dt_bias: self.dt_bias,
            A: self.a,
            Bm: self.b,
            Cm: self.c,
            v: self.v.0,
            z: self.z.0,
            Dp: self.d,
            h0: self.h0,
            sum_delta,
            Sst: sst,
            y_t,
            y_raw,
            h_last,
            hsq,
            dsum,
            dt_bs: to_i64(self.dt.1, "scan: dt batch stride")?,
            bc_bs: to_i64(self.bc.0, "scan: B/C batch stride")?,
            v_bs: to_i64(self.v.1, "scan: v batch stride")?,
            z_bs: to_i64(self.z.1, "scan: z batch stride")?,
            s: self.dims,
            dt_ts: to_i32(self.dt.2, "scan: dt row stride")?,
            a_is_log: i32::from(self.a_is_log),
            bc_ts: to_i32(self.bc.1, "scan: B/C row stride")?,
            v_ts: to_i32(self.v.2, "scan: v row stride")?,
            z_ts: to_i32(self.z.2, "scan: z row stride")?,
        })
    }
}

/// Runs the two chunked-scan kernels. Outputs: y_t (T, gated), y_raw (f32), h_last, telemetry.
///
/// # Safety
/// The pointers of `a` must address live device memory of the shapes and dtypes
/// [`ScanChunkOutParams`] documents for `a.dims` and `dtype`, until the launches complete on the
/// device's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scan_launch(
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
    let (bn, q, di, n, lc) = (s.Bn as usize, s.Q as usize, s.di as usize, s.N as usize, s.LC as usize);
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
        let params = a.chunk_sum_params(dptr(sd)?, dptr(ss)?)?;
        // SAFETY: the inputs of `a` are live views of the shapes its dims give (this function's
        // `# Safety`), sd (B, Q, di) and ss (B, Q, di, N) the f32 scratch above, held to the end
        // of this function (candle's stream orders their release after both launches).
        unsafe {
            Launch::new(
                func(cd, Module::Scan, &format!("scan_chunk_sum_{sfx}"))?,
                grid,
                128,
                (lc * n * 4) as u32,
            )
            .params(params)
            .run(&stream)
        }?;
    }
    let params = a.chunk_out_params(
        dptr_opt(sum_delta.as_ref())?,
        dptr_opt(big_s.as_ref())?,
        dptr_opt(y_t)?,
        dptr_opt(y_raw)?,
        dptr_opt(h_last)?,
        dptr_opt(hsq)?,
        dptr_opt(dsum)?,
    )?;
    // SAFETY: as above; the outputs are the caller's tensors (or null), of the shapes
    // ScanChunkOutParams gives for `a.dims`.
    unsafe {
        Launch::new(
            func(cd, Module::Scan, &format!("scan_chunk_out_{sfx}"))?,
            grid,
            128,
            ((2 * lc * n + 2 * lc) * 4) as u32,
        )
        .params(params)
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
        dims: ScanIn::new(bn, len, di, n, lc, q)?,
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
    // SAFETY: the pointers of `args` address the contiguous f32 tensors above (v, delta (B, L,
    // di), a (di, N), b, c (B, L, N), h0 (B, di, N)), held until this function returns.
    unsafe { scan_launch(dev, DType::F32, &args, None, Some(&y), Some(&h_last), hsq.as_ref(), dsum.as_ref()) }?;
    Ok(ScanOut {
        y,
        h_last,
        h_norm: hsq.map(|h| h.sqrt()).transpose()?,
    })
}
