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
use crate::ops::cuda::{dptr, empty, func, Launch, Module, ScanIn};

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
#[allow(clippy::too_many_arguments)] // pointers of one launch
pub fn conv_forward(
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
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe {
        Launch::new(
            func(dev, Module::MambaTrain, &format!("conv_silu_fwd_{sfx}"))?,
            (d.di.div_ceil(THREADS as usize) as u32, (d.bn * d.len).min(65535) as u32, 1),
            THREADS,
            0,
        )
        .i32(d.bn)
        .i32(d.len)
        .i32(d.di)
        .i32(d.k)
        .ptr(u)
        .i32(su)
        .ptr(st)
        .ptr(w)
        .ptr(b)
        .ptr(v)
        .ptr(v16)
        .ptr(st_out)
        .run(&dev.cuda_stream())
    }
}

/// The conv's backward: the gradient of v is `gv` (f32, (B, L, di)) plus `gv2` (bf16, same shape)
/// where not 0; du written at rows of stride `sdu` in the kernel's dtype; returns (dw (di, 1, K),
/// db (di)) f32. `u`, `su`, `st`, `w`, `b` as [`conv_forward`].
#[allow(clippy::too_many_arguments)] // pointers of one launch
pub fn conv_backward(
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
    unsafe {
        // every element written
        Launch::new(
            func(cd, Module::MambaTrain, &format!("conv_silu_bwd_{sfx}"))?,
            (d.di.div_ceil(THREADS as usize) as u32, tiles as u32, d.bn as u32),
            THREADS,
            0,
        )
        .i32(d.bn)
        .i32(d.len)
        .i32(d.di)
        .i32(d.k)
        .i32(CONV_TILE)
        .ptr(u)
        .i32(su)
        .ptr(st)
        .ptr(dptr(w)?)
        .ptr(dptr(b)?)
        .ptr(gv)
        .ptr(gv2)
        .ptr(du)
        .i32(sdu)
        .ptr(dptr(&part)?)
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
/// kernels read them; `h0` the state before the sequence (0: zeros). `dims.lc` / `dims.q` are
/// set here.
#[allow(clippy::too_many_arguments)] // pointers of three launches
pub fn tail_backward(
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
    let (bn, len, di, n) = (dims.bn as usize, dims.l as usize, dims.di as usize, dims.n as usize);
    let (lc, q) = (BWD_CHUNK, len.div_ceil(BWD_CHUNK));
    let dims = ScanIn {
        lc: lc as i32,
        q: q as i32,
        ..dims
    };
    let stream = cd.cuda_stream();
    // 1. each chunk's ΣΔ, end state from 0 and start carry from 0
    let sum_delta = empty(&[bn * q * di], DType::F32, dev)?;
    let hs = empty(&[bn * q * di * n], DType::F32, dev)?;
    let lr = empty(&[bn * q * di * n], DType::F32, dev)?;
    let cbs = di.div_ceil(BWD_CHANNELS); // blocks of channels, for the chunk summaries and the gradients
    let inputs = |l: Launch| {
        l.ptr(io.v.0)
            .ptr(io.dt.0)
            .ptr(io.z.0)
            .ptr(io.go)
            .i32(io.v.1)
            .i32(io.dt.1)
            .i32(io.z.1)
            .ptr(bc)
            .ptr(p)
    };
    let chunks = Launch::new(
        func(cd, Module::MambaTrain, &format!("scan_tail_chunks_{sfx}"))?,
        (cbs as u32, q as u32, bn as u32),
        BWD_THREADS,
        0,
    )
    .scan(dims);
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe { inputs(chunks).ptr(dptr(&sum_delta)?).ptr(dptr(&hs)?).ptr(dptr(&lr)?).run(&stream) }?;
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe {
        // 2. composed into each chunk's start state and incoming carry (in place)
        Launch::new(
            func(cd, Module::MambaTrain, "scan_tail_carry_f32")?,
            ((bn * di * n).div_ceil(256) as u32, 1, 1),
            256,
            0,
        )
        .scan(dims)
        .ptr(p)
        .ptr(h0)
        .ptr(dptr(&sum_delta)?)
        .ptr(dptr(&hs)?)
        .ptr(dptr(&lr)?)
        .run(&stream)
    }?;
    // 3. the gradients, chunk groups in parallel; dB, dC per channel block, then summed
    let groups = BWD_BLOCKS.div_ceil(cbs * bn).clamp(1, q);
    let cpg = q.div_ceil(groups);
    let groups = q.div_ceil(cpg);
    let dbc_part = empty(&[bn, cbs, len, 2 * n], DType::F32, dev)?; // every element written
    let bwd = Launch::new(
        func(cd, Module::MambaTrain, &format!("scan_tail_bwd_{sfx}"))?,
        (cbs as u32, groups as u32, bn as u32),
        BWD_THREADS,
        0,
    )
    .scan(dims)
    .int(cpg as i32);
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe {
        inputs(bwd)
            .ptr(dptr(&hs)?)
            .ptr(dptr(&lr)?)
            .ptr(io.dv.0)
            .ptr(io.ddt.0)
            .ptr(io.dz.0)
            .ptr(io.yg)
            .i32(io.dv.1)
            .i32(io.ddt.1)
            .i32(io.dz.1)
            .ptr(dptr(&dbc_part)?)
            .ptr(dptr(dp)?)
            .run(&stream)
    }?;
    let total = bn * len * 2 * n;
    // SAFETY: arguments as the kernel declares them (kernels/*.cu); each pointer addresses a live tensor above.
    unsafe {
        Launch::new(
            func(cd, Module::MambaTrain, "scan_tail_dbc_f32")?,
            (total.div_ceil(256) as u32, 1, 1),
            256,
            0,
        )
        .i32(bn)
        .i32(cbs)
        .i32(len * 2 * n)
        .ptr(dptr(&dbc_part)?)
        .ptr(dptr(dbc)?)
        .run(&stream)
    }
}
