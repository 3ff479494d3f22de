//! Launches of the fine-tuning kernels of kernels/mamba_train.cu, shared by the Mamba mixer's
//! autograd ops (`ops::mamba_grad`, every tensor f32) and the half-block backward without autograd
//! (`ops::mamba_block_grad`, the projections' bf16 buffers read and written in place).
//!
//! Every tensor is addressed by a device pointer and a row stride in elements (one row per
//! (sequence, position)), so a kernel reads the [u; z] halves of in_proj's output or the packed
//! [v; dt; z] of the autograd op without copying them out.
#![allow(unsafe_code)]

use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::ops::cuda::{dptr, empty, func, Launch, Module};
use crate::ops::params::{
    to_i32, ConvSiluBwdParams, ConvSiluFwdParams, ScanIn, ScanTailBwdParams, ScanTailCarryParams, ScanTailChunksParams, ScanTailDbcParams,
};

/// Largest conv width the kernels take (`KMAX` in kernels/mamba_train.cu).
pub const KMAX: usize = 8;
/// Largest state size the scan kernels take.
pub const NMAX: usize = 16;
/// Steps per thread of the conv backward (one partial dw/db row per tile).
const CONV_TILE: usize = 64;
/// Chunk length of the scan backward (`BLC` in kernels/mamba_train.cu): chunks run in parallel,
/// each from its start state and its incoming adjoint carry.
const BWD_CHUNK: usize = 32;
/// Channels a block of `scan_tail_chunks_*` / `scan_tail_bwd_*` takes (`BCT`), and its threads
/// (`BWD_BLOCK`).
const BWD_CHANNELS: usize = 64;
const BWD_THREADS: u32 = 128;
/// Blocks the scan backward's last kernel aims for (chunks are grouped per block to get near
/// it: about four waves of an H200 at four blocks an SM).
const BWD_BLOCKS: usize = 2048;
pub const THREADS: u32 = 128;

/// The conv's sizes: B sequences of L positions, di channels, width K.
#[derive(Debug, Clone, Copy)]
pub struct ConvDims {
    pub bn: usize,
    pub len: usize,
    pub di: usize,
    pub k: usize,
}

/// v = SiLU(conv(u) + b) (f32, (B, L, di)) and, where not 0, `v16` its bf16 copy and `st_out`
/// (B, di, K) the conv state after the sequence. `u` rows of stride `su`, of the kernel's dtype
/// `sfx` ("f32" or "bf16"); `st` the state before (0: zeros); `w` (di, K), `b` (di) f32.
///
/// # Safety
/// Every pointer that is not 0 must address live device memory of the shape and dtype above
/// (u: B·L rows of stride `su` holding di values), until the launch completes on the stream.
#[allow(clippy::too_many_arguments)] // pointers of one launch
pub unsafe fn conv_forward(
    dev: &CudaDevice,
    sfx: &str,
    d: ConvDims,
    u: u64,
    su: usize,
    st: u64,
    w: u64,
    b: u64,
    v: u64,
    v16: u64,
    st_out: u64,
) -> Result<()> {
    let params = ConvSiluFwdParams {
        u,
        st,
        cw: w,
        cb: b,
        v,
        v16,
        st_out,
        Bn: to_i32(d.bn, "conv: batch")?,
        L: to_i32(d.len, "conv: length")?,
        di: to_i32(d.di, "conv: channels")?,
        K: to_i32(d.k, "conv: width")?,
        su: to_i32(su, "conv: u row stride")?,
    };
    // SAFETY: the caller's promise (see `# Safety`).
    unsafe {
        Launch::new(
            func(dev, Module::MambaTrain, &format!("conv_silu_fwd_{sfx}"))?,
            (d.di.div_ceil(THREADS as usize) as u32, (d.bn * d.len).min(65535) as u32, 1),
            THREADS,
            0,
        )
        .params(params)
        .run(&dev.cuda_stream())
    }
}

/// The conv's backward: the gradient of v is `gv` (f32, (B, L, di)) plus `gv2` (bf16, same shape)
/// where not 0; du written at rows of stride `sdu` in the kernel's dtype; returns (dw (di, 1, K),
/// db (di)) f32. `u`, `su`, `st`, `w`, `b` as [`conv_forward`].
///
/// # Safety
/// As for [`conv_forward`]: `u`, `st`, `gv`, `gv2` (where not 0) and du (B·L rows of stride
/// `sdu`) must address live device memory of those shapes until the launch completes.
#[allow(clippy::too_many_arguments)] // pointers of one launch
pub unsafe fn conv_backward(
    dev: &Device,
    cd: &CudaDevice,
    sfx: &str,
    d: ConvDims,
    (u, su, st): (u64, usize, u64),
    w: &Tensor,
    b: &Tensor,
    (gv, gv2): (u64, u64),
    (du, sdu): (u64, usize),
) -> Result<(Tensor, Tensor)> {
    let tiles = d.len.div_ceil(CONV_TILE);
    let part = empty(&[d.bn * tiles, d.k + 1, d.di], DType::F32, dev)?;
    let params = ConvSiluBwdParams {
        u,
        st,
        cw: dptr(w)?,
        cb: dptr(b)?,
        gv,
        gv2,
        du,
        part: dptr(&part)?,
        Bn: to_i32(d.bn, "conv backward: batch")?,
        L: to_i32(d.len, "conv backward: length")?,
        di: to_i32(d.di, "conv backward: channels")?,
        K: to_i32(d.k, "conv backward: width")?,
        tile: to_i32(CONV_TILE, "conv backward: tile")?,
        su: to_i32(su, "conv backward: u row stride")?,
        sdu: to_i32(sdu, "conv backward: du row stride")?,
    };
    // SAFETY: the caller's promise for the raw pointers (see `# Safety`); w (di, 1, K) and b
    // (di) are the caller's f32 tensors, part (B·tiles, K+1, di) f32 the scratch above (every
    // element written), all held until this function returns.
    unsafe {
        Launch::new(
            func(cd, Module::MambaTrain, &format!("conv_silu_bwd_{sfx}"))?,
            (d.di.div_ceil(THREADS as usize) as u32, tiles as u32, d.bn as u32),
            THREADS,
            0,
        )
        .params(params)
        .run(&cd.cuda_stream())
    }?;
    let sums = part.sum(0)?; // (K+1, di): the tiles' partial sums, in a fixed order
    let dw = sums.narrow(0, 0, d.k)?.t()?.contiguous()?.reshape((d.di, 1, d.k))?;
    let db = sums.narrow(0, d.k, 1)?.reshape(d.di)?;
    Ok((dw, db))
}

/// The scan tail's tensors (`TailIo` in kernels/mamba_train.cu): device pointers and row strides
/// (elements) of v (f32), dt, z (the kernel's dtype) and go = dL/dout ((B, L, di), the kernel's
/// dtype), and of the gradients dv (f32), ddt, dz and, where not 0, yg ((B, L, di)) = out itself.
#[derive(Debug, Clone, Copy)]
pub struct TailPtrs {
    pub v: (u64, usize),
    pub dt: (u64, usize),
    pub z: (u64, usize),
    pub go: u64,
    pub dv: (u64, usize),
    pub ddt: (u64, usize),
    pub dz: (u64, usize),
    pub yg: u64,
}

/// The scan tail's backward, chunks in parallel (kernels `scan_tail_chunks_*`,
/// `scan_tail_carry_f32`, `scan_tail_bwd_*`, `scan_tail_dbc_f32`): writes every element of io's
/// dv, ddt and dz (and yg) and the gradients of B and C into `dbc` ((B, L, 2N) f32), adds those
/// of [A_log; D; bias] into `dp` ((di·N + 2·di) f32, zeroed by the caller). `bc` (B, L, 2N) and `p` f32 as the
/// kernels read them; `h0` the state before the sequence (0: zeros). `dims.LC` / `dims.Q` are
/// set here.
///
/// # Safety
/// Every pointer of `io` that is not 0, and `bc`, `p` and `h0` (where not 0), must address
/// live device memory of the shapes above for `dims` (B·L rows of the given strides holding di
/// values for the (B, L, di) tensors) until the launches complete on the stream.
#[allow(clippy::too_many_arguments)] // pointers of three launches
pub unsafe fn tail_backward(
    dev: &Device,
    cd: &CudaDevice,
    sfx: &str,
    dims: ScanIn,
    io: &TailPtrs,
    bc: u64,
    p: u64,
    h0: u64,
    dbc: &Tensor,
    dp: &Tensor,
) -> Result<()> {
    let (bn, len, di, n) = (dims.Bn as usize, dims.L as usize, dims.di as usize, dims.N as usize);
    let (lc, q) = (BWD_CHUNK, len.div_ceil(BWD_CHUNK));
    let dims = ScanIn {
        LC: to_i32(lc, "scan backward: chunk length")?,
        Q: to_i32(q, "scan backward: chunks")?,
        ..dims
    };
    let stream = cd.cuda_stream();
    // 1. each chunk's ΣΔ, end state from 0 and start carry from 0
    let sum_delta = empty(&[bn * q * di], DType::F32, dev)?;
    let hs = empty(&[bn * q * di * n], DType::F32, dev)?;
    let lr = empty(&[bn * q * di * n], DType::F32, dev)?;
    let cbs = di.div_ceil(BWD_CHANNELS); // blocks of channels, for the chunk summaries and the gradients
    let (sv, sdt, sz) = (
        to_i32(io.v.1, "scan backward: v row stride")?,
        to_i32(io.dt.1, "scan backward: dt row stride")?,
        to_i32(io.z.1, "scan backward: z row stride")?,
    );
    let params = ScanTailChunksParams {
        v: io.v.0,
        dt: io.dt.0,
        z: io.z.0,
        go: io.go,
        bc,
        P: p,
        sum_delta: dptr(&sum_delta)?,
        S_: dptr(&hs)?,
        Lq: dptr(&lr)?,
        s: dims,
        sv,
        sdt,
        sz,
    };
    // SAFETY: io, bc and p by the caller's promise (see `# Safety`); sum_delta (B·Q·di), hs and
    // lr (B·Q·di·N) are the f32 scratch above, held until this function returns (candle's
    // stream orders their release after the launches).
    unsafe {
        Launch::new(
            func(cd, Module::MambaTrain, &format!("scan_tail_chunks_{sfx}"))?,
            (cbs as u32, q as u32, bn as u32),
            BWD_THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    let params = ScanTailCarryParams {
        P: p,
        h0,
        sum_delta: dptr(&sum_delta)?,
        HS: dptr(&hs)?,
        LR: dptr(&lr)?,
        s: dims,
    };
    // SAFETY: as above; h0 (B, di, N) f32 or 0 by the caller's promise.
    unsafe {
        // 2. composed into each chunk's start state and incoming carry (in place)
        Launch::new(
            func(cd, Module::MambaTrain, "scan_tail_carry_f32")?,
            ((bn * di * n).div_ceil(256) as u32, 1, 1),
            256,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    // 3. the gradients, chunk groups in parallel; dB, dC per channel block, then summed
    let groups = BWD_BLOCKS.div_ceil(cbs * bn).clamp(1, q);
    let cpg = q.div_ceil(groups);
    let groups = q.div_ceil(cpg);
    let dbc_part = empty(&[bn, cbs, len, 2 * n], DType::F32, dev)?; // every element written
    let params = ScanTailBwdParams {
        v: io.v.0,
        dt: io.dt.0,
        z: io.z.0,
        go: io.go,
        bc,
        P: p,
        H: dptr(&hs)?,
        R: dptr(&lr)?,
        dv: io.dv.0,
        ddt: io.ddt.0,
        dz: io.dz.0,
        yg: io.yg,
        dbc_part: dptr(&dbc_part)?,
        dP: dptr(dp)?,
        s: dims,
        cpg: to_i32(cpg, "scan backward: chunks per block")?,
        sv,
        sdt,
        sz,
        sdv: to_i32(io.dv.1, "scan backward: dv row stride")?,
        sddt: to_i32(io.ddt.1, "scan backward: ddt row stride")?,
        sdz: to_i32(io.dz.1, "scan backward: dz row stride")?,
    };
    // SAFETY: as above; dbc_part (B, CB, L, 2N) f32 is the scratch above, dp the caller's
    // (di·N + 2·di) f32 tensor.
    unsafe {
        Launch::new(
            func(cd, Module::MambaTrain, &format!("scan_tail_bwd_{sfx}"))?,
            (cbs as u32, groups as u32, bn as u32),
            BWD_THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    let total = bn * len * 2 * n;
    let params = ScanTailDbcParams {
        part: dptr(&dbc_part)?,
        dbc: dptr(dbc)?,
        Bn: to_i32(bn, "scan backward: batch")?,
        CB: to_i32(cbs, "scan backward: channel blocks")?,
        L2N: to_i32(len * 2 * n, "scan backward: B/C row")?,
    };
    // SAFETY: dbc_part (B, CB, L, 2N) f32 is the scratch above, dbc the caller's (B, L, 2N)
    // f32 tensor; both held until this function returns.
    unsafe {
        Launch::new(
            func(cd, Module::MambaTrain, "scan_tail_dbc_f32")?,
            (total.div_ceil(256) as u32, 1, 1),
            256,
            0,
        )
        .params(params)
        .run(&stream)
    }
}
