//! Self-attention of OLMoE and Mixtral: RoPE (rotate-half), grouped-query attention, OLMoE's
//! QK-norm and clamp, Mixtral's sliding window, and one key/value cache per layer.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale in the model's
/// dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// cos and sin (T, head_dim) of positions `start..start+len`, computed in f32 and cast to `dtype`
/// (transformers' default RoPE: inverse frequencies `theta^(-2i/d)`, the halves repeated).
pub fn rope_tables(theta: f64, head_dim: usize, start: usize, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in start..start + len {
        for _half in 0..2 {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (len, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `x·cos + rotate_half(x)·sin` for x (1, heads, T, d) and tables (T, d).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The keys and values one layer keeps: (1, kv_heads, S, d) each, S ≤ window − 1 with a sliding
/// window (older entries can never be seen again).
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cached keys and values take on their device.
    pub fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, v)| {
            k.elem_count() * k.dtype().size_in_bytes() + v.elem_count() * v.dtype().size_in_bytes()
        })
    }

    /// A cache holding `k` and `v`, (1, kv_heads, S, d) each (for benchmarks that fill a long
    /// context without running it).
    pub fn from_kv(k: Tensor, v: Tensor) -> Result<Self> {
        if k.dims() != v.dims() || k.rank() != 4 {
            return Err(crate::error::Error::Invalid(format!(
                "internal: key and value caches must be (1, kv_heads, S, d) alike, got {:?} and {:?}",
                k.dims(),
                v.dims()
            )));
        }
        Ok(Self { kv: Some((k, v)) })
    }
}

/// One layer's attention weights and shape.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k, v, o projections (out, in).
    pub q_proj: Tensor,
    /// Key projection.
    pub k_proj: Tensor,
    /// Value projection.
    pub v_proj: Tensor,
    /// Output projection.
    pub o_proj: Tensor,
    /// OLMoE's RMSNorm over all query heads together (heads·d), if present.
    pub q_norm: Option<Tensor>,
    /// OLMoE's RMSNorm over all key heads together (kv_heads·d), if present.
    pub k_norm: Option<Tensor>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// RMSNorm epsilon (QK-norm).
    pub eps: f64,
    /// Clamp of q, k and v.
    pub clip_qkv: Option<f64>,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// RoPE base.
    pub rope_theta: f64,
}

fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, h, n, s, d))?.reshape((b, h * n, s, d))?)
}

/// Additive mask (T, S) for queries at `q0..q0+t` over keys at `k0..k0+s`: 0 where the key is at
/// or before the query and inside the window, −∞ elsewhere.
fn mask(q0: usize, t: usize, k0: usize, s: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mut m = Vec::with_capacity(t * s);
    for i in 0..t {
        let q = q0 + i;
        for j in 0..s {
            let k = k0 + j;
            let seen = k <= q && window.is_none_or(|w| k + w > q);
            m.push(if seen { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Tensor::from_vec(m, (t, s), device)?)
}

impl Attention {
    /// Attends `x` (T, H) at positions `pos..pos+T`, appending to and trimming `cache`.
    pub fn forward(&self, x: &Tensor, pos: usize, cache: &mut LayerCache) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let d = self.head_dim;
        let mut q = x.matmul(&self.q_proj.t()?)?;
        let mut k = x.matmul(&self.k_proj.t()?)?;
        let mut v = x.matmul(&self.v_proj.t()?)?;
        if let Some(w) = &self.q_norm {
            q = rms_norm(&q, w, self.eps)?;
        }
        if let Some(w) = &self.k_norm {
            k = rms_norm(&k, w, self.eps)?;
        }
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let q = q.reshape((1, t, self.heads, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((1, t, self.kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((1, t, self.kv_heads, d))?.transpose(1, 2)?.contiguous()?;
        let (cos, sin) = rope_tables(self.rope_theta, d, pos, t, x.dtype(), x.device())?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;

        let (k, v) = match cache.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let s = k.dims()[2];
        let k0 = pos + t - s;
        let groups = self.heads / self.kv_heads;
        let kr = repeat_kv(&k, groups)?;
        let vr = repeat_kv(&v, groups)?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&kr.t()?)? * scale)?.to_dtype(DType::F32)?;
        let needs_mask = t > 1 || self.window.is_some_and(|w| s > w);
        let scores = if needs_mask {
            scores.broadcast_add(&mask(pos, t, k0, s, self.window, x.device())?)?
        } else {
            scores
        };
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(x.dtype())?;
        let out = attn.matmul(&vr.contiguous()?)?;
        let out = out.transpose(1, 2)?.reshape((t, self.heads * d))?;

        let keep = match self.window {
            Some(w) => s.min(w.saturating_sub(1)),
            None => s,
        };
        cache.kv = Some(if keep < s {
            (
                k.narrow(2, s - keep, keep)?.contiguous()?,
                v.narrow(2, s - keep, keep)?.contiguous()?,
            )
        } else {
            (k, v)
        });
        Ok(out.matmul(&self.o_proj.t()?)?)
    }
}
