//! The Mamba mixer for fine-tuning on the GPU: the projections as tensor ops, the elementwise
//! chains between them as the fused autograd ops of [`crate::ops::mamba_grad`]. Twin:
//! `MambaMixer::forward` with `fused_scan` off (tests/mamba_grad_gpu.rs).

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::model::mamba::MambaMixer;
use crate::model::state::LayerState;
use crate::ops::mamba_grad::{conv_silu, scan_tail, TailIn};
use crate::ops::mamba_kernels::{KMAX, NMAX};
use crate::ops::prof::{self, lap};

/// `MambaMixer::forward` for training on the GPU: in_proj, [`conv_silu`], x_proj/dt_proj,
/// [`scan_tail`], out_proj, advancing `state`. `None` when the shapes are past the kernels
/// (K > 8, N > 16) or the tensors are not on a CUDA device: the caller takes the tensor-op path.
pub fn mixer_forward(m: &MambaMixer, x: &Tensor, state: &mut LayerState) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || m.d_conv == 0 || m.d_conv > KMAX || m.d_state == 0 || m.d_state > NMAX {
        return Ok(None);
    }
    let di = m.d_inner;
    let mut laps = prof::start(x.device())?; // `bench --finetune --profile`; None otherwise
    let xz = m.in_proj.forward(x)?; // (B, L, 2·di)
    lap(&mut laps, "mamba in_proj")?;
    let u = xz.narrow(D::Minus1, 0, di)?; // (B, L, di)
    let z = xz.narrow(D::Minus1, di, di)?; // (B, L, di)
    let (v, new_conv) = conv_silu(&u, &m.conv_w, &m.conv_b, &state.conv)?; // (B, L, di), (B, di, K)
    lap(&mut laps, "mamba conv-silu (fused)")?;
    let (dt, bm, cm) = m.ssm_raw(&v)?; // (B, L, di), (B, L, N), (B, L, N)
    lap(&mut laps, "mamba x_proj+dt_proj")?;
    let tail = TailIn {
        v: &v,
        dt: &dt,
        z: &z,
        b: &bm,
        c: &cm,
        a_log: &m.a_log,
        d: &m.d,
        dt_bias: &m.dt_bias,
        h0: &state.ssm,
    };
    let (y, h_last) = scan_tail(&tail)?; // (B, L, di), (B, di, N)
    lap(&mut laps, "mamba scan-tail (fused)")?;
    let out = m.out_proj.forward(&y.to_dtype(m.out_proj.weight.dtype())?)?; // (B, L, d)
    lap(&mut laps, "mamba out_proj")?;
    state.conv = new_conv;
    state.ssm = h_last;
    Ok(Some(out))
}
