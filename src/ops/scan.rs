//! The selective scan of the full-sequence (prefill) path, built from tensor ops (SPEC §5 step 7,
//! §10): per channel i and state n, `h_t = a_t·h_{t−1} + b_t` with `a_t = exp(Δ_t[i]·A[i,n])` and
//! `b_t = Δ_t[i]·B_t[n]·v_t[i]`. The pairs (a, b) compose associatively, (a₁,b₁)∘(a₂,b₂) =
//! (a₁a₂, a₂b₁ + b₂), so each chunk of the sequence is scanned in ⌈log₂ chunk⌉ whole-tensor rounds
//! (Hillis–Steele), and h is carried from chunk to chunk. Only products of decays ≤ 1 appear, so
//! it is stable on any length. Autograd sees every op, so fine-tuning differentiates through it.

use candle_core::{Tensor, D};

use crate::error::Result;

/// Tokens scanned together; memory per chunk is B·chunk·d_inner·N floats per live tensor.
pub const SCAN_CHUNK: usize = 64;

/// Output of [`selective_scan`].
pub struct ScanOut {
    /// `Σ_n h_t[i,n]·C_t[n]`, without the D skip term: (B, L, d_inner)
    pub y: Tensor,
    /// h at the last position: (B, d_inner, N)
    pub h_last: Tensor,
    /// ‖h_t‖ over (d_inner, N) per position, when asked for: (B, L)
    pub h_norm: Option<Tensor>,
}

/// Scans a sequence from the state `h0`.
///
/// * `v`, `delta`: (B, L, d_inner) f32 — the SSM input and the step sizes Δ
/// * `a`: (d_inner, N) f32 — A = −exp(A_log)
/// * `b`, `c`: (B, L, N) f32 — the input-dependent B and C
/// * `h0`: (B, d_inner, N) f32
pub fn selective_scan(v: &Tensor, delta: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor, h0: &Tensor, want_norm: bool) -> Result<ScanOut> {
    let (_bsz, len, _di) = v.dims3()?;
    let mut h_prev = h0.clone();
    let mut ys = Vec::with_capacity(len.div_ceil(SCAN_CHUNK));
    let mut norms = Vec::new();
    let mut start = 0;
    while start < len {
        let lc = SCAN_CHUNK.min(len - start);
        let dl = delta.narrow(1, start, lc)?; // (B, lc, di)
        let vl = v.narrow(1, start, lc)?;
        let bl = b.narrow(1, start, lc)?; // (B, lc, N)
        let cl = c.narrow(1, start, lc)?;
        // a_t = exp(Δ_t ⊗ A): (B, lc, di, N); b_t = (Δ_t·v_t) ⊗ B_t: (B, lc, di, N)
        let mut da = dl.unsqueeze(3)?.broadcast_mul(&a.unsqueeze(0)?.unsqueeze(0)?)?.exp()?;
        let mut db = (dl * vl)?.unsqueeze(3)?.broadcast_mul(&bl.unsqueeze(2)?)?;
        let mut s = 1;
        while s < lc {
            // element t combines with element t−s; the first s have nothing before them
            let db_prev = db.narrow(1, 0, lc - s)?.pad_with_zeros(1, s, 0)?;
            let da_prev = (da.narrow(1, 0, lc - s)? - 1.0)?.pad_with_zeros(1, s, 0)?.affine(1.0, 1.0)?;
            db = ((&da * db_prev)? + db)?;
            da = (da * da_prev)?;
            s *= 2;
        }
        // h_t = (Π a)·h_prev + b: (B, lc, di, N)
        let h = (da.broadcast_mul(&h_prev.unsqueeze(1)?)? + db)?;
        // y_t[i] = Σ_n h_t[i,n]·C_t[n]: (B, lc, di)
        ys.push(h.broadcast_mul(&cl.unsqueeze(2)?)?.sum(D::Minus1)?);
        if want_norm {
            norms.push(h.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?.sqrt()?); // (B, lc)
        }
        h_prev = h.narrow(1, lc - 1, 1)?.squeeze(1)?; // (B, di, N)
        start += lc;
    }
    let y = if ys.len() == 1 {
        ys.pop().unwrap_or(h_prev.zeros_like()?)
    } else {
        Tensor::cat(&ys, 1)?
    };
    let h_norm = if want_norm { Some(Tensor::cat(&norms, 1)?) } else { None };
    Ok(ScanOut { y, h_last: h_prev, h_norm })
}
