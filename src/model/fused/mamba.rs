//! The fused Mamba mixer: full sequence (conv kernel, chunked scan kernels, cuBLAS products) and
//! single-token step (conv + x_proj kernel, SSM step kernel). Twins: `MambaMixer::{forward, step}`.
#![allow(unsafe_code)]

use candle_core::{DType, Tensor, D};

use super::{launch_cap, push_host, THREADS};
use crate::error::Result;
use crate::model::mamba::MambaMixer;
use crate::model::probe::MambaRecord;
use crate::model::state::LayerState;
use crate::ops::cuda::{blocks_for, cuda_device, dptr, dptr_opt, empty, func, suffix, Launch, Module};
use crate::ops::params::{to_i32, Conv1dFwdParams, ConvXprojParams, ScanIn, SsmStepParams};
use crate::ops::prof::{self, lap};
use crate::ops::scan_kernels::{scan_chunks, scan_launch, telemetry_sums, ScanArgs};

/// Whether a Mamba mixer can take the fused path (no adapters on x_proj/dt_proj, one dtype).
/// Whether the kernels take this mixer; `seq`: the full-sequence path, where x_proj and dt_proj
/// run through [`crate::model::linear::Linear::forward`] and so may carry adapters (the step
/// reads their weights directly).
pub(crate) fn mamba_fusable(m: &MambaMixer, seq: bool) -> bool {
    let dt = m.in_proj.weight.dtype();
    (seq || (m.x_proj.lora.is_none() && m.dt_proj.lora.is_none()))
        && m.x_proj.bias.is_none()
        && m.dt_proj.bias.is_none()
        && [&m.x_proj.weight, &m.dt_proj.weight, &m.out_proj.weight]
            .iter()
            .all(|w| w.dtype() == dt)
        && suffix(dt).is_ok()
        && m.d_state <= 16
        && m.d_conv <= 32
}

/// Fused full-sequence Mamba mixer: x (B, L, d) -> (B, L, d). Twin: [`MambaMixer::forward`].
pub fn mamba_forward(m: &MambaMixer, x: &Tensor, state: &mut LayerState, probe: Option<&mut MambaRecord>) -> Result<Tensor> {
    if !mamba_fusable(m, true) {
        return m.forward(x, state, probe, crate::ops::scan_train::FusedScan::Off);
    }
    let (bn, len, _d) = x.dims3()?;
    let (di, k, n, r) = (m.d_inner, m.d_conv, m.d_state, m.dt_rank);
    let r2 = r + 2 * n;
    let dev = x.device();
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    let dt = m.in_proj.weight.dtype();
    let sfx = suffix(dt)?;
    let es = dt.size_in_bytes();
    let mut laps = prof::start(dev)?;
    let xz = m.in_proj.forward(x)?.to_dtype(dt)?.contiguous()?; // (B, L, 2·di) eq. 1
    lap(&mut laps, "mamba.in_proj")?;
    // eqs. 2-3: causal depthwise conv from the state's window, SiLU; v in f32 and in T
    let v = empty(&[bn, len, di], DType::F32, dev)?;
    let vt = empty(&[bn, len, di], dt, dev)?;
    let new_conv = empty(&[bn, di, k], DType::F32, dev)?;
    let conv_in = state.conv.contiguous()?;
    let cw = m.conv_w.contiguous()?;
    let cb = m.conv_b.contiguous()?;
    let params = Conv1dFwdParams {
        xz: dptr(&xz)?,
        conv_in: dptr(&conv_in)?,
        cw: dptr(&cw)?, // (di, 1, K)
        cb: dptr(&cb)?,
        v: dptr(&v)?,
        vt: dptr(&vt)?,
        conv_out: dptr(&new_conv)?,
        Bn: to_i32(bn, "Mamba prefill: batch")?,
        L: to_i32(len, "Mamba prefill: length")?,
        di: to_i32(di, "Mamba prefill: d_inner")?,
        K: to_i32(k, "Mamba prefill: conv width")?,
        xz_stride: to_i32(2 * di, "Mamba prefill: in_proj width")?,
    };
    // SAFETY: xz (B, L, 2·di) T, conv_in and new_conv (B, di, K) f32, cw (di, 1, K) and cb (di)
    // f32, v (B, L, di) f32 and vt (B, L, di) T are contiguous tensors bound in this function
    // until it returns.
    unsafe {
        Launch::new(
            func(cd, Module::Prefill, &format!("conv1d_fwd_{sfx}"))?,
            (di.div_ceil(THREADS as usize) as u32, (bn * len).min(65535) as u32, 1),
            THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    lap(&mut laps, "mamba.conv")?;
    // eqs. 4-5 inputs: [δ; B; C] = W_x v (cuBLAS), dt = W_dt δ (cuBLAS); softplus in the scan
    let xdbl = m.x_proj.forward(&vt)?.contiguous()?; // (B, L, R+2N) T
    let dtr = m.dt_proj.forward(&xdbl.narrow(D::Minus1, 0, r)?)?.contiguous()?; // (B, L, di) T
    lap(&mut laps, "mamba.x_proj+dt_proj")?;
    let (lc, q) = scan_chunks(len);
    let xdbl_p = dptr(&xdbl)?;
    let xz_p = dptr(&xz)?;
    // contiguous views bound here so that they outlive the launches
    let (dt_bias, a_log, dd, h0) = (
        m.dt_bias.contiguous()?,
        m.a_log.contiguous()?,
        m.d.contiguous()?,
        state.ssm.contiguous()?,
    );
    let args = ScanArgs {
        dims: ScanIn::new(bn, len, di, n, lc, q)?,
        dt: (dptr(&dtr)?, len * di, di),
        dt_bias: dptr(&dt_bias)?,
        a: dptr(&a_log)?,
        a_is_log: true,
        b: xdbl_p + (r * es) as u64,
        c: xdbl_p + ((r + n) * es) as u64,
        bc: (len * r2, r2),
        v: (dptr(&v)?, len * di, di),
        z: (xz_p + (di * es) as u64, len * 2 * di, 2 * di),
        d: dptr(&dd)?,
        h0: dptr(&h0)?,
    };
    let y = empty(&[bn, len, di], dt, dev)?;
    let h_last = empty(&[bn, di, n], DType::F32, dev)?;
    let (hsq, dsum) = telemetry_sums(bn, len, probe.is_some(), dev)?;
    // SAFETY: args' pointers address the tensors above, bound in this function until it returns:
    // dtr (B, L, di) T, dt_bias and dd (di) f32, a_log (di, N) f32, B and C (B, L, N) as strided
    // views into xdbl (B, L, R+2N) T, v (B, L, di) f32, z into xz (B, L, 2di) T, h0 (B, di, N) f32;
    // y (B, L, di) T and h_last (B, di, N) f32 are the outputs just allocated.
    unsafe { scan_launch(dev, dt, &args, Some(&y), None, Some(&h_last), hsq.as_ref(), dsum.as_ref()) }?;
    lap(&mut laps, "mamba.scan")?;
    let out = m.out_proj.forward(&y)?; // (B, L, d) eq. 9
    lap(&mut laps, "mamba.out_proj")?;
    if let Some(p) = probe {
        // conv state after token t holds u_{t−K+1..t}: a window sum of u² (as the twin)
        let u = xz.narrow(D::Minus1, 0, di)?.to_dtype(DType::F32)?; // (B, L, di)
        let prev = state.conv.narrow(2, 1, k - 1)?.transpose(1, 2)?; // (B, K−1, di)
        let u_ext = Tensor::cat(&[&prev, &u], 1)?;
        let u2 = u_ext.sqr()?.sum(D::Minus1)?; // (B, L+K−1)
        let mut cn = u2.narrow(1, 0, len)?;
        for tap in 1..k {
            cn = (cn + u2.narrow(1, tap, len)?)?;
        }
        push_host(&mut p.conv_norm, &cn.sqrt()?)?;
        if let Some(h) = &hsq {
            push_host(&mut p.ssm_norm, &h.sqrt()?)?;
        }
        if let Some(ds) = &dsum {
            push_host(&mut p.mean_delta, &(ds / di as f64)?)?;
        }
    }
    state.conv = new_conv;
    state.ssm = h_last;
    Ok(out)
}

/// Fused single-token Mamba mixer: x (B, d) -> (B, d). Twin: [`MambaMixer::step`].
pub fn mamba_step(m: &MambaMixer, x: &Tensor, state: &mut LayerState, probe: Option<&mut MambaRecord>) -> Result<Tensor> {
    if !mamba_fusable(m, false) {
        return m.step(x, state, probe);
    }
    let bn = x.dim(0)?;
    let (di, k, n, r) = (m.d_inner, m.d_conv, m.d_state, m.dt_rank);
    let r2 = r + 2 * n;
    let dev = x.device();
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    let cap = launch_cap(dev)?;
    let dt = m.in_proj.weight.dtype();
    let sfx = suffix(dt)?;
    let es = dt.size_in_bytes();
    let xz = m.in_proj.forward(x)?.to_dtype(dt)?.contiguous()?; // (B, 2·di)
    let conv_in = state.conv.contiguous()?;
    let cw = m.conv_w.contiguous()?;
    let cb = m.conv_b.contiguous()?;
    let wx = m.x_proj.weight.contiguous()?;
    let dbc = empty(&[bn, r2], dt, dev)?;
    let vec = i32::from((di * es) % 16 == 0);
    let warps = THREADS / 32;
    let params = ConvXprojParams {
        xz: dptr(&xz)?,
        conv: dptr(&conv_in)?,
        cw: dptr(&cw)?,
        cb: dptr(&cb)?,
        Wx: dptr(&wx)?,
        dbc: dptr(&dbc)?,
        di: to_i32(di, "Mamba step: d_inner")?,
        K: to_i32(k, "Mamba step: conv width")?,
        R2: to_i32(r2, "Mamba step: x_proj rows")?,
        xz_stride: to_i32(2 * di, "Mamba step: in_proj width")?,
        vec,
    };
    // SAFETY: xz (B, 2·di) T, conv_in (B, di, K) f32, cw (di, 1, K) and cb (di) f32, wx
    // (R+2N, di) T and dbc (B, R+2N) T are the contiguous tensors above, bound until this
    // function returns (candle's stream orders their release after the launch).
    unsafe {
        Launch::new(
            func(cd, Module::MambaStep, &format!("conv_xproj_{sfx}"))?,
            (blocks_for(r2, warps, cap), bn as u32, 1),
            THREADS,
            (di * es) as u32,
        )
        .params(params)
        .run(&stream)
    }?;
    let y = empty(&[bn, di], dt, dev)?;
    let new_conv = empty(&[bn, di, k], DType::F32, dev)?;
    let new_h = empty(&[bn, di, n], DType::F32, dev)?;
    let telem = if probe.is_some() {
        Some(Tensor::zeros((bn, 3), DType::F32, dev)?)
    } else {
        None
    };
    let h_in = state.ssm.contiguous()?;
    // contiguous views bound here so that they outlive the launch
    let (wdt, dt_bias, a_log, dd) = (
        m.dt_proj.weight.contiguous()?,
        m.dt_bias.contiguous()?,
        m.a_log.contiguous()?,
        m.d.contiguous()?,
    );
    let params = SsmStepParams {
        xz: dptr(&xz)?,
        conv_in: dptr(&conv_in)?,
        conv_out: dptr(&new_conv)?,
        cw: dptr(&cw)?,
        cb: dptr(&cb)?,
        dbc: dptr(&dbc)?,
        Wdt: dptr(&wdt)?,
        dt_bias: dptr(&dt_bias)?,
        A_log: dptr(&a_log)?,
        Dp: dptr(&dd)?,
        h_in: dptr(&h_in)?,
        h_out: dptr(&new_h)?,
        y: dptr(&y)?,
        telem: dptr_opt(telem.as_ref())?,
        Bn: to_i32(bn, "Mamba step: batch")?,
        di: to_i32(di, "Mamba step: d_inner")?,
        R: to_i32(r, "Mamba step: dt rank")?,
        N: to_i32(n, "Mamba step: state size")?,
        K: to_i32(k, "Mamba step: conv width")?,
        xz_stride: to_i32(2 * di, "Mamba step: in_proj width")?,
        telem_mode: 0,
    };
    // SAFETY: every pointer is a contiguous tensor bound in this function until it returns:
    // xz (B, 2·di) T, conv_in / new_conv (B, di, K) f32, cw, cb, dbc (B, R+2N) T, wdt (di, R)
    // T, dt_bias and dd (di) f32, a_log (di, N) f32, h_in / new_h (B, di, N) f32, y (B, di) T,
    // telem (B, 3) f32 or null.
    unsafe {
        Launch::new(
            func(cd, Module::MambaStep, &format!("ssm_step_{sfx}"))?,
            (blocks_for(bn * di, warps, u32::MAX), 1, 1),
            THREADS,
            0,
        )
        .params(params)
        .run(&stream)
    }?;
    let out = m.out_proj.forward(&y)?; // (B, d)
    if let (Some(p), Some(t)) = (probe, &telem) {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        for row in v.chunks(3) {
            p.ssm_norm.push(row[0].sqrt());
            p.conv_norm.push(row[1].sqrt());
            p.mean_delta.push(row[2] / di as f32);
        }
    }
    state.conv = new_conv;
    state.ssm = new_h;
    Ok(out)
}
