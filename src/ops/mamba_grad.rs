//! The Mamba mixer's elementwise chains as fused autograd ops, for fine-tuning on the GPU
//! (kernels/mamba_train.cu and the forward scan kernels of kernels/scan.cu):
//!
//! * [`conv_silu`]: v = SiLU(causal depthwise conv1d(u) + bias), continuing the conv state;
//! * [`scan_tail`]: out = (Σ_n h·C + D·v)·SiLU(z) with Δ = softplus(dt + bias), A = −exp(A_log);
//!
//! Each op keeps only its inputs and recomputes the rest in its backward kernel; the tensor-op
//! chains they replace materialised and differentiated a full f32 (B, L, d_inner) tensor per
//! elementwise op. `model::fused::mamba_train` runs the mixer with them; the twin is
//! `MambaMixer::forward` with `fused_scan` off (tests/mamba_grad_gpu.rs).
//! Neither op differentiates the incoming state (training starts every sequence at zero).
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::{Error, Result};
use crate::ops::cuda::{cuda_device, dptr, empty, f32_ptr, func, to_candle, Launch, Module};
use crate::ops::mamba_kernels::{conv_backward, conv_forward, tail_backward, ConvDims, TailPtrs, KMAX, NMAX, THREADS};
use crate::ops::params::ScanIn;
use crate::ops::scan_kernels::ScanArgs;

fn f32c(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// v = SiLU(conv(u) + b): inputs u (B, L, di), w (di, 1, K), b (di); `st` (B, di, K) the incoming
/// conv state (not differentiated), `st_out` (B, di, K) written with the outgoing one.
struct ConvSiluOp {
    st: Tensor,
    st_out: Tensor,
    bn: usize,
    len: usize,
    di: usize,
    k: usize,
}

impl CustomOp3 for ConvSiluOp {
    crate::ops::cuda::cuda_only_op3!("conv-silu");

    fn cuda_fwd(
        &self,
        su: &CudaStorage,
        lu: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = su.device().clone();
        let (bn, len, di) = (self.bn, self.len, self.di);
        let v = dev.alloc_zeros::<f32>(bn * len * di)?;
        let vp = v.device_ptr(&dev.cuda_stream()).0;
        let d = ConvDims { bn, len, di, k: self.k };
        let (st, st_out) = (dptr(&self.st).map_err(to_candle)?, dptr(&self.st_out).map_err(to_candle)?);
        let (up, wp, bp) = (f32_ptr(su, lu, "conv")?, f32_ptr(sw, lw, "conv")?, f32_ptr(sb, lb, "conv")?);
        // SAFETY: u (B, L, di), w (di, 1, K) and b (di) are the op's contiguous f32 inputs
        // (f32_ptr checks), st and st_out (B, di, K) f32 are held by the op, v (B, L, di) f32 is
        // the output just allocated (returned).
        unsafe { conv_forward(&dev, "f32", d, up, di, st, wp, bp, vp, 0, st_out) }.map_err(to_candle)?;
        Ok((CudaStorage::wrap_cuda_slice(v, dev), Shape::from((bn, len, di))))
    }
}

impl ConvSiluOp {
    fn backward(&self, u: &Tensor, w: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (bn, len, di) = (self.bn, self.len, self.di);
        let dev = u.device();
        let cd = cuda_device(dev)?;
        let (u, w, b, gv) = (u.contiguous()?, w.contiguous()?, b.contiguous()?, f32c(grad)?);
        let du = empty(&[bn, len, di], DType::F32, dev)?; // every element written
        let d = ConvDims { bn, len, di, k: self.k };
        // SAFETY: u, gv and du (B, L, di) f32 and st (B, di, K) f32 are contiguous tensors held
        // until this function returns.
        let (dw, db) = unsafe {
            conv_backward(
                dev,
                cd,
                "f32",
                d,
                (dptr(&u)?, di, dptr(&self.st)?),
                &w,
                &b,
                (dptr(&gv)?, 0),
                (dptr(&du)?, di),
            )
        }?;
        Ok((du, dw, db))
    }
}

/// The causal depthwise conv + SiLU of eqs. 2–3 as one autograd op: u (B, L, di), w (di, 1, K),
/// b (di), `state` (B, di, K) the conv state before the sequence -> (v (B, L, di), the conv
/// state after it). Gradients for u, w and b (not the state). f32 out; K at most 8.
pub fn conv_silu(u: &Tensor, w: &Tensor, b: &Tensor, state: &Tensor) -> Result<(Tensor, Tensor)> {
    let (bn, len, di) = u.dims3()?;
    let k = w.dim(D::Minus1)?;
    if k == 0 || k > KMAX || len == 0 {
        return Err(Error::Invalid(format!("conv-silu op: conv width {k} / length {len} out of range")));
    }
    let st_out = Tensor::zeros((bn, di, k), DType::F32, u.device())?;
    let op = ConvSiluOp {
        st: f32c(&state.detach())?,
        st_out: st_out.clone(),
        bn,
        len,
        di,
        k,
    };
    let v = f32c(u)?.apply_op3(&f32c(w)?, &f32c(b)?, op)?;
    Ok((v, st_out))
}

/// The scan tail: vdz (B, L, 3, di) [v; dt; z], bc (B, L, 2N) [B; C], p (di·N + 2·di)
/// [A_log; D; dt_bias] -> out (B, L, di). `h0` (B, di, N) not differentiated; `h_last`
/// (B, di, N) written with the final state.
struct ScanTailOp {
    h0: Tensor,
    h_last: Tensor,
    dims: ScanIn,
}

impl CustomOp3 for ScanTailOp {
    crate::ops::cuda::cuda_only_op3!("scan-tail");

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
        let s = self.dims;
        let (bn, len, di, n, lc, q) = (
            s.Bn as usize,
            s.L as usize,
            s.di as usize,
            s.N as usize,
            s.LC as usize,
            s.Q as usize,
        );
        let (pv, pbc, pp) = (
            f32_ptr(s1, l1, "scan tail")?,
            f32_ptr(s2, l2, "scan tail")?,
            f32_ptr(s3, l3, "scan tail")?,
        );
        let out = dev.alloc_zeros::<f32>(bn * len * di)?;
        let sum_delta = dev.alloc_zeros::<f32>((bn * q * di).max(1))?;
        let big_s = dev.alloc_zeros::<f32>((bn * q * di * n).max(1))?;
        let stream = dev.cuda_stream();
        let (op, sdp, ssp) = (
            out.device_ptr(&stream).0,
            sum_delta.device_ptr(&stream).0,
            big_s.device_ptr(&stream).0,
        );
        let grid = (di.div_ceil(THREADS as usize) as u32, q as u32, bn as u32);
        let (v_bs, v_ts) = (len * 3 * di, 3 * di);
        let (bc_bs, bc_ts) = (len * 2 * n, 2 * n);
        let f4 = |i: usize| (i * 4) as u64;
        let (pdt, pz, pd, pbias) = (pv + f4(di), pv + f4(2 * di), pp + f4(di * n), pp + f4(di * n + di));
        // vdz = [v; dt; z] (B, L, 3, di), bc = [B; C] (B, L, 2N), p = [A_log; D; dt_bias] read in
        // place as strided views
        let args = ScanArgs {
            dims: s,
            dt: (pdt, v_bs, v_ts),
            dt_bias: pbias,
            a: pp,
            a_is_log: true,
            b: pbc,
            c: pbc + f4(n),
            bc: (bc_bs, bc_ts),
            v: (pv, v_bs, v_ts),
            z: (pz, v_bs, v_ts),
            d: pd,
            h0: dptr(&self.h0).map_err(to_candle)?,
        };
        if q > 1 {
            let params = args.chunk_sum_params(sdp, ssp).map_err(to_candle)?;
            // SAFETY: vdz (B, L, 3, di), bc (B, L, 2N) and p (di·N + 2·di) are the op's
            // contiguous f32 inputs (f32_ptr checks) and the views above stay inside them;
            // sum_delta (B, Q, di) and big_s (B, Q, di, N) are the f32 scratch above, alive until
            // this function returns (the stream orders their release after the launch).
            unsafe {
                Launch::new(
                    func(&dev, Module::Scan, "scan_chunk_sum_f32").map_err(to_candle)?,
                    grid,
                    THREADS,
                    (lc * n * 4) as u32,
                )
                .params(params)
                .run(&stream)
            }
            .map_err(to_candle)?;
        }
        let params = args
            .chunk_out_params(sdp, ssp, op, 0, dptr(&self.h_last).map_err(to_candle)?, 0, 0)
            .map_err(to_candle)?;
        // SAFETY: as above; h0 and h_last (B, di, N) f32 are held by the op, out (B, L, di) f32
        // is the output just allocated (returned).
        unsafe {
            Launch::new(
                func(&dev, Module::Scan, "scan_chunk_out_f32").map_err(to_candle)?,
                grid,
                THREADS,
                ((2 * lc * n + 2 * lc) * 4) as u32,
            )
            .params(params)
            .run(&stream)
        }
        .map_err(to_candle)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((bn, len, di))))
    }
}

impl ScanTailOp {
    fn backward(&self, vdz: &Tensor, bc: &Tensor, p: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (bn, len, di, n) = (
            self.dims.Bn as usize,
            self.dims.L as usize,
            self.dims.di as usize,
            self.dims.N as usize,
        );
        let dev = vdz.device();
        let cd = cuda_device(dev)?;
        let (vdz, bc, p, go) = (vdz.contiguous()?, bc.contiguous()?, p.contiguous()?, f32c(grad)?);
        let dvdz = empty(&[bn, len, 3, di], DType::F32, dev)?; // every element written
        let dbc = empty(&[bn, len, 2 * n], DType::F32, dev)?; // every element written
        let dp = Tensor::zeros(p.dims(), DType::F32, dev)?;
        let (pv, pg) = (dptr(&vdz)?, dptr(&dvdz)?);
        let f4 = |i: usize| (i * 4) as u64;
        let io = TailPtrs {
            v: (pv, 3 * di),
            dt: (pv + f4(di), 3 * di),
            z: (pv + f4(2 * di), 3 * di),
            go: dptr(&go)?,
            dv: (pg, 3 * di),
            ddt: (pg + f4(di), 3 * di),
            dz: (pg + f4(2 * di), 3 * di),
            yg: 0,
        };
        // SAFETY: io's pointers are strided views inside vdz and dvdz (B, L, 3, di) f32 and go
        // (B, L, di) f32; bc (B, L, 2N), p (di·N + 2·di) and h0 (B, di, N) are contiguous f32;
        // all are held until this function returns.
        unsafe { tail_backward(dev, cd, "f32", self.dims, &io, dptr(&bc)?, dptr(&p)?, dptr(&self.h0)?, &dbc, &dp) }?;
        Ok((dvdz, dbc, dp))
    }
}

/// Inputs of [`scan_tail`]; every tensor is differentiated but `h0`.
pub struct TailIn<'a> {
    /// (B, L, di) the conv output
    pub v: &'a Tensor,
    /// (B, L, di) dt_proj's output, before the bias
    pub dt: &'a Tensor,
    /// (B, L, di) the gate input
    pub z: &'a Tensor,
    /// (B, L, N) each
    pub b: &'a Tensor,
    pub c: &'a Tensor,
    /// (di, N)
    pub a_log: &'a Tensor,
    /// (di) each
    pub d: &'a Tensor,
    pub dt_bias: &'a Tensor,
    /// (B, di, N) the state before the sequence
    pub h0: &'a Tensor,
}

/// eqs. 5–9 after the projections as one autograd op: out = (Σ_n h·C + D·v)·SiLU(z) with
/// Δ = softplus(dt + dt_bias), A = −exp(A_log) -> (out (B, L, di), the final state (B, di, N)).
/// f32 out; N at most 16.
pub fn scan_tail(x: &TailIn) -> Result<(Tensor, Tensor)> {
    let (bn, len, di) = x.v.dims3()?;
    let n = x.a_log.dim(1)?;
    if n == 0 || n > NMAX || len == 0 {
        return Err(Error::Invalid(format!("scan-tail op: state size {n} / length {len} out of range")));
    }
    let vdz = Tensor::stack(&[&f32c(x.v)?, &f32c(x.dt)?, &f32c(x.z)?], 2)?.contiguous()?; // (B, L, 3, di)
    let bc = Tensor::cat(&[&f32c(x.b)?, &f32c(x.c)?], 2)?.contiguous()?; // (B, L, 2N)
    let p = Tensor::cat(&[&f32c(x.a_log)?.flatten_all()?, &f32c(x.d)?, &f32c(x.dt_bias)?], 0)?.contiguous()?; // (di·N + 2·di)
    let h_last = Tensor::zeros((bn, di, n), DType::F32, x.v.device())?;
    let lc = len.div_ceil(32).div_ceil(16).clamp(1, 16) * 16; // as the inference scan
    let op = ScanTailOp {
        h0: f32c(&x.h0.detach())?,
        h_last: h_last.clone(),
        dims: ScanIn::new(bn, len, di, n, lc, len.div_ceil(lc))?,
    };
    Ok((vdz.apply_op3(&bc, &p, op)?, h_last))
}
