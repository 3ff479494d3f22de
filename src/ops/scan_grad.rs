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
use crate::ops::cuda::{dptr, dptr_opt, f32_ptr, func, to_candle, Launch, Module, ScanIn};

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
        let dims = ScanIn {
            bn: bn as i32,
            l: len as i32,
            di: di as i32,
            n: n as i32,
            lc: lc as i32,
            q: q as i32,
        };
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
        if q > 1 {
            // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
            unsafe {
                Launch::new(
                    func(&dev, Module::Scan, "scan_chunk_sum_f32").map_err(to_candle)?,
                    grid,
                    128,
                    (lc * n * 4) as u32,
                )
                .scan(dims)
                .ptr(pvd + (di * 4) as u64)
                .i64(v_bs)
                .i32(v_ts)
                .ptr(0)
                .ptr(pa)
                .int(0)
                .ptr(pbc)
                .i64(bc_bs)
                .i32(bc_ts)
                .ptr(pvd)
                .i64(v_bs)
                .i32(v_ts)
                .ptr(sdp)
                .ptr(ssp)
                .run(&stream)
            }
            .map_err(to_candle)?;
        }
        // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
        unsafe {
            Launch::new(
                func(&dev, Module::Scan, "scan_chunk_out_f32").map_err(to_candle)?,
                grid,
                128,
                ((2 * lc * n + 2 * lc) * 4) as u32,
            )
            .scan(dims)
            .ptr(pvd + (di * 4) as u64)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(0)
            .ptr(pa)
            .int(0)
            .ptr(pbc)
            .ptr(pbc + (n * 4) as u64)
            .i64(bc_bs)
            .i32(bc_ts)
            .ptr(pvd)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(0)
            .i64(0)
            .i32(0)
            .ptr(0)
            .ptr(h0)
            .ptr(sdp)
            .ptr(ssp)
            .ptr(0)
            .ptr(yp)
            .ptr(0)
            .ptr(0)
            .ptr(0)
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
        let dims = ScanIn {
            bn: bn as i32,
            l: len as i32,
            di: di as i32,
            n: n as i32,
            lc: lc as i32,
            q: q as i32,
        };
        let (v_bs, v_ts) = (len * 2 * di, 2 * di);
        let (bc_bs, bc_ts) = (len * 2 * n, 2 * n);
        // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
        unsafe {
            Launch::new(
                func(cd, Module::Scan, "scan_bwd_f32")?,
                (di.div_ceil(128) as u32, bn as u32, 1),
                128,
                (lc * 2 * n * 4) as u32,
            )
            .scan(dims)
            .ptr(pvd + (di * 4) as u64)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(dptr(&a)?)
            .ptr(pbc)
            .ptr(pbc + (n * 4) as u64)
            .i64(bc_bs)
            .i32(bc_ts)
            .ptr(pvd)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(dptr_opt(self.h0.as_ref())?)
            .ptr(dptr(&gy)?)
            .ptr(dptr(&hs)?)
            .ptr(dptr(&hist)?)
            .ptr(pdvd)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(pdvd + (di * 4) as u64)
            .i64(v_bs)
            .i32(v_ts)
            .ptr(pdbc)
            .ptr(pdbc + (n * 4) as u64)
            .i64(bc_bs)
            .i32(bc_ts)
            .ptr(dptr(&da)?)
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
