//! The chunked selective scan as an autograd op: forward by `scan_chunk_sum_f32` /
//! `scan_chunk_out_f32`, backward by `scan_bwd_f32` (kernels/scan.cu). For fine-tuning on the
//! GPU; the twin is [`crate::ops::scan::selective_scan`], whose every op autograd sees.
//!
//! Inputs are packed into three tensors (a candle custom op takes at most three):
//! `vd` = stack([v, Δ], 2) (B, L, 2, d_inner), `bc` = cat([B, C], 2) (B, L, 2N), `a` (d_inner, N).
//! The output is y = Σ_n h·C (B, L, d_inner), without the D skip term, like the twin's `y`.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::ops::cuda::{dptr, dptr_opt, f32_ptr, func, to_candle, Launch, Module};
use crate::ops::params::{to_i32, to_i64, ScanBwdParams, ScanIn};
use crate::ops::scan_kernels::ScanArgs;

/// Chunk length of the backward pass (its per-channel history lives in a (B, LC, N, d_inner) scratch).
const BWD_CHUNK: usize = 16;

struct ScanOp {
    h0: Option<Tensor>,
    bn: usize,
    len: usize,
    di: usize,
    n: usize,
}

impl CustomOp3 for ScanOp {
    crate::ops::cuda::cuda_only_op3!("selective-scan");

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let (bn, len, di, n) = (self.bn, self.len, self.di, self.n);
        let (pvd, pbc, pa) = (
            f32_ptr(s1, l1, "selective-scan")?,
            f32_ptr(s2, l2, "selective-scan")?,
            f32_ptr(s3, l3, "selective-scan")?,
        );
        let lc = len.div_ceil(32).div_ceil(16).clamp(1, 16) * 16;
        let q = len.div_ceil(lc);
        let dims = ScanIn::new(bn, len, di, n, lc, q).map_err(to_candle)?;
        let y = dev.alloc_zeros::<f32>(bn * len * di)?;
        let sum_delta = dev.alloc_zeros::<f32>((bn * q * di).max(1))?;
        let big_s = dev.alloc_zeros::<f32>((bn * q * di * n).max(1))?;
        let stream = dev.cuda_stream();
        let yp = y.device_ptr(&stream).0;
        let sdp = sum_delta.device_ptr(&stream).0;
        let ssp = big_s.device_ptr(&stream).0;
        let h0 = dptr_opt(self.h0.as_ref()).map_err(to_candle)?;
        let grid = (di.div_ceil(128) as u32, q as u32, bn as u32);
        let (v_bs, v_ts) = (len * 2 * di, 2 * di);
        let (bc_bs, bc_ts) = (len * 2 * n, 2 * n);
        // vd = [v, Δ] (B, L, 2, di) and bc = [B, C] (B, L, 2N) read in place as strided views
        let args = ScanArgs {
            dims,
            dt: (pvd + (di * 4) as u64, v_bs, v_ts),
            dt_bias: 0,
            a: pa,
            a_is_log: false,
            b: pbc,
            c: pbc + (n * 4) as u64,
            bc: (bc_bs, bc_ts),
            v: (pvd, v_bs, v_ts),
            z: (0, 0, 0),
            d: 0,
            h0,
        };
        if q > 1 {
            let params = args.chunk_sum_params(sdp, ssp).map_err(to_candle)?;
            // SAFETY: vd (B, L, 2, di), bc (B, L, 2N) and a (di, N) are the op's contiguous f32
            // inputs (f32_ptr checks), the views above stay inside them; sum_delta (B, Q, di)
            // and big_s (B, Q, di, N) are the f32 scratch above, alive until this function
            // returns (the stream orders their release after the launch).
            unsafe {
                Launch::new(
                    func(&dev, Module::Scan, "scan_chunk_sum_f32").map_err(to_candle)?,
                    grid,
                    128,
                    (lc * n * 4) as u32,
                )
                .params(params)
                .run(&stream)
            }
            .map_err(to_candle)?;
        }
        let params = args.chunk_out_params(sdp, ssp, 0, yp, 0, 0, 0).map_err(to_candle)?;
        // SAFETY: as above; h0 (B, di, N) f32 is held by the op (or null), y (B, L, di) f32 is
        // the output just allocated (returned).
        unsafe {
            Launch::new(
                func(&dev, Module::Scan, "scan_chunk_out_f32").map_err(to_candle)?,
                grid,
                128,
                ((2 * lc * n + 2 * lc) * 4) as u32,
            )
            .params(params)
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((bn, len, di))))
    }
}

impl ScanOp {
    fn backward(&self, vd: &Tensor, bc: &Tensor, a: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (bn, len, di, n) = (self.bn, self.len, self.di, self.n);
        let dev = vd.device();
        let cd = crate::ops::cuda::cuda_device(dev)?;
        let (vd, bc, a, gy) = (
            vd.contiguous()?,
            bc.contiguous()?,
            a.contiguous()?,
            grad.to_dtype(DType::F32)?.contiguous()?,
        );
        let lc = BWD_CHUNK;
        let q = len.div_ceil(lc);
        let hs = Tensor::zeros(bn * q * di * n, DType::F32, dev)?;
        let hist = Tensor::zeros(bn * lc * n * di, DType::F32, dev)?;
        let dvd = Tensor::zeros((bn, len, 2, di), DType::F32, dev)?;
        let dbc = Tensor::zeros((bn, len, 2 * n), DType::F32, dev)?;
        let da = Tensor::zeros((di, n), DType::F32, dev)?;
        let (pvd, pbc, pdvd, pdbc) = (dptr(&vd)?, dptr(&bc)?, dptr(&dvd)?, dptr(&dbc)?);
        // vd = [v, Δ] (B, L, 2, di) and bc = [B, C] (B, L, 2N) read in place as strided views
        let (v_bs, v_ts) = (
            to_i64(len * 2 * di, "scan backward: v batch stride")?,
            to_i32(2 * di, "scan backward: v row stride")?,
        );
        let (bc_bs, bc_ts) = (
            to_i64(len * 2 * n, "scan backward: B/C batch stride")?,
            to_i32(2 * n, "scan backward: B/C row stride")?,
        );
        let params = ScanBwdParams {
            dt: pvd + (di * 4) as u64,
            A: dptr(&a)?,
            Bm: pbc,
            Cm: pbc + (n * 4) as u64,
            v: pvd,
            h0: dptr_opt(self.h0.as_ref())?,
            gy: dptr(&gy)?,
            hs: dptr(&hs)?,
            hist: dptr(&hist)?,
            dv: pdvd,
            dd: pdvd + (di * 4) as u64,
            dB: pdbc,
            dC: pdbc + (n * 4) as u64,
            dA: dptr(&da)?,
            dt_bs: v_bs,
            bc_bs,
            v_bs,
            dv_bs: v_bs,
            dd_bs: v_bs,
            dbc_bs: bc_bs,
            s: ScanIn::new(bn, len, di, n, lc, q)?,
            dt_ts: v_ts,
            bc_ts,
            v_ts,
            dv_ts: v_ts,
            dd_ts: v_ts,
            dbc_ts: bc_ts,
        };
        // SAFETY: vd and dvd (B, L, 2, di), bc and dbc (B, L, 2N), a and da (di, N), gy (B, L,
        // di), hs (B·Q·di·N), hist (B·LC·N·di) and h0 (B, di, N, or null) are the contiguous f32
        // tensors above (the strided views stay inside them), held until this function returns.
        unsafe {
            Launch::new(
                func(cd, Module::Scan, "scan_bwd_f32")?,
                (di.div_ceil(128) as u32, bn as u32, 1),
                128,
                (lc * 2 * n * 4) as u32,
            )
            .params(params)
            .run(&cd.cuda_stream())
        }?;
        Ok((dvd, dbc, da))
    }
}

/// y = Σ_n h_t·C_t of the scan (B, L, d_inner), differentiable w.r.t. v, delta, a, b and c
/// (not h0). Shapes as [`crate::ops::scan::selective_scan`]; all f32; N at most 16.
pub fn selective_scan_grad(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: Option<&Tensor>) -> Result<Tensor> {
    let (bn, len, di) = v.dims3()?;
    let n = a.dim(1)?;
    if n > 16 {
        return Err(Error::Invalid(format!("selective-scan op: state size {n} is over 16")));
    }
    let vd = Tensor::stack(&[&v.to_dtype(DType::F32)?, &delta.to_dtype(DType::F32)?], 2)?.contiguous()?; // (B, L, 2, di)
    let bc = Tensor::cat(&[&b.to_dtype(DType::F32)?, &c.to_dtype(DType::F32)?], 2)?.contiguous()?; // (B, L, 2N)
    let op = ScanOp {
        h0: h0
            .map(|h| h.detach().to_dtype(DType::F32).and_then(|t| t.contiguous()))
            .transpose()?,
        bn,
        len,
        di,
        n,
    };
    Ok(vd.apply_op3(&bc, &a.to_dtype(DType::F32)?.contiguous()?, op)?)
}
