//! Linear layers (optional bias, optional LoRA adapter) and the two norms of the model.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// A low-rank adapter on a linear layer: y += scale · (x Aᵀ) Bᵀ.
#[derive(Debug, Clone)]
pub struct Lora {
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank)
    pub b: Tensor,
    /// alpha / rank
    pub scale: f64,
}

/// y = x Wᵀ (+ b) (+ LoRA), computed in the weight's dtype; W: (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// The quantised form of `weight` (`--quant`, see [`crate::quant`]); `weight` then holds its
    /// dequantised values, which every path but the CPU's GGML matmul computes with.
    pub quant: Option<std::sync::Arc<crate::quant::QLinear>>,
    /// Calibration (GPTQ, [`crate::quant::gptq`]): while set, every forward adds its inputs' XᵀX.
    pub tap: Option<crate::quant::gptq::Tap>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quant: None,
            tap: None,
        }
    }

    /// Applies the layer to (.., in) -> (.., out). The input is cast to the weight dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let wdt = self.weight.dtype();
        if let Some(tap) = &self.tap {
            crate::quant::gptq::accumulate(tap, &x.reshape(((), inner))?)?;
        }
        let packed = match &self.quant {
            Some(q) => q.matmul(&x.reshape(((), inner))?)?, // (n, out) f32 on the CPU's GGML matmul
            None => None,
        };
        let x2 = x.to_dtype(wdt)?.reshape(((), inner))?; // (n, in)
        let mut y = match packed {
            Some(y) => y.to_dtype(wdt)?,
            None => x2.matmul(&self.weight.t()?)?, // (n, out)
        };
        if let Some(l) = &self.lora {
            // The adapter runs in the activation's dtype (as PyTorch autocast would): the small A
            // and B are cast (their f32 masters get f32 gradients through the cast), never the
            // (n, in) input or the (n, out) update; the scale multiplies the (n, rank) product.
            // An f32 layer (the CPU) computes exactly as before but for where the scale is applied.
            let wdt = y.dtype();
            let xa = (x2.matmul(&l.a.to_dtype(wdt)?.t()?)? * l.scale)?; // (n, rank)
            y = (y + xa.matmul(&l.b.to_dtype(wdt)?.t()?)?)?; // (n, out)
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }

    /// Visits `{prefix}.weight`, `.bias` and the adapter's `.lora_a` / `.lora_b`.
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f(&format!("{prefix}.weight"), &mut self.weight)?;
        if let Some(b) = &mut self.bias {
            f(&format!("{prefix}.bias"), b)?;
        }
        if let Some(l) = &mut self.lora {
            f(&format!("{prefix}.lora_a"), &mut l.a)?;
            f(&format!("{prefix}.lora_b"), &mut l.b)?;
        }
        Ok(())
    }

    /// The effective weight W + scale·B·A (for merging adapters).
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => {
                let delta = (l.b.to_dtype(DType::F32)?.matmul(&l.a.to_dtype(DType::F32)?)? * l.scale)?;
                Ok((self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(self.weight.dtype())?)
            }
        }
    }
}

/// RMSNorm in f32 (weight only): x · rsqrt(mean(x²) + eps) · w. `x` is f32 (.., d).
/// `differentiable` picks the tensor-op form that autograd can see; otherwise the fused op.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (.., 1)
        Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }
}

/// LayerNorm in f32 with weight and bias. `x` is f32 (.., d).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)?)
    } else {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)?)
    }
}

/// softplus(x) = log(1 + eˣ) in a form that never overflows: max(x, 0) + log1p(e^{-|x|}).
/// log1p(y) is computed as log(1+y)·y/((1+y)−1) (Goldberg's trick), exact to f32 rounding even
/// for tiny y, where log(1+y) alone would lose most digits (small Δ would be off by 1e-3).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let y = x.abs()?.neg()?.exp()?; // e^{-|x|} in (0, 1]
    let u = (&y + 1.0)?;
    let d = (&u - 1.0)?; // y as represented after rounding 1 + y
    let tiny = d.eq(0.0)?;
    // Keep the unused branch finite so that no NaN reaches the gradient.
    let d_safe = tiny.where_cond(&d.ones_like()?, &d)?;
    let ratio = tiny.where_cond(&y, &(u.log()? * (&y / d_safe)?)?)?;
    Ok((x.relu()? + ratio)?)
}
