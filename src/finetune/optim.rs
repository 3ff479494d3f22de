//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101) over
//! f32 master parameters, a linear-warmup + cosine learning-rate schedule, and global-norm
//! gradient clipping. The state (first and second moments) lives on the parameters' device and
//! is saved with the checkpoint, so a resumed run takes exactly the same steps.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// One trainable tensor: its checkpoint name, the f32 master copy and whether it decays.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Weight decay applies (not to A_log, D, norms and biases).
    pub decay: bool,
}

/// Whether weight decay applies to a tensor of this checkpoint name (SPEC §9: A_log and D are
/// flagged no-decay in the reference; norms and biases by the usual convention).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("A_log") || name.ends_with(".D") || name.contains("norm") || name.ends_with(".bias"))
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW moments per parameter, in the order of the parameter list.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub hp: AdamWParams,
    /// Updates taken so far (the t of the bias corrections).
    pub t: u64,
    /// (m, v) per parameter, f32, shaped like it
    pub moments: Vec<(Tensor, Tensor)>,
    /// Update CUDA parameters with the fused kernel (the model's kernels on); off, tensor ops.
    pub fused: bool,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Param], hp: AdamWParams) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                // two buffers: the fused step updates them in place
                let t = p.var.as_tensor();
                Ok((t.zeros_like()?, t.zeros_like()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            hp,
            t: 0,
            moments,
            fused: true,
        })
    }

    /// One update with gradients `grads` (one per parameter, f32) multiplied by `grad_scale`
    /// (the clipping factor) at learning rate `lr`. `casts`: per parameter, the model's
    /// low-precision copy of it, or empty; true when the update also rewrote those copies in
    /// place (the fused kernel), false when the caller has to recast.
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64, casts: &[Option<Tensor>]) -> Result<bool> {
        if grads.len() != params.len() || self.moments.len() != params.len() {
            return Err(Error::Invalid("optimiser: parameter and gradient lists differ in length".into()));
        }
        self.t += 1;
        #[cfg(feature = "cuda")]
        if self.fused && self.fusable(params) {
            self.step_fused(params, grads, lr, grad_scale, casts)?;
            return Ok(!casts.is_empty());
        }
        #[cfg(not(feature = "cuda"))]
        let _ = casts;
        self.step_ops(params, grads, lr, grad_scale)?;
        Ok(false)
    }

    /// Whether every parameter and moment is an f32 CUDA tensor (the fused kernel's inputs).
    #[cfg(feature = "cuda")]
    fn fusable(&self, params: &[Param]) -> bool {
        let ok = |t: &Tensor| t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous();
        params.iter().all(|p| ok(p.var.as_tensor())) && self.moments.iter().all(|(m, v)| ok(m) && ok(v))
    }

    /// The update of step `self.t` by the fused CUDA kernel (`ops::optim::adamw`), in place,
    /// writing each parameter's copy in `casts` (when given: one entry per parameter) as well.
    #[cfg(feature = "cuda")]
    pub fn step_fused(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64, casts: &[Option<Tensor>]) -> Result<()> {
        if !casts.is_empty() && casts.len() != params.len() {
            return Err(Error::Invalid("optimiser: parameter and copy lists differ in length".into()));
        }
        let (bc1, bc2) = self.corrections();
        for (k, ((p, g), (m, v))) in params.iter().zip(grads).zip(&self.moments).enumerate() {
            let decay = if p.decay && self.hp.weight_decay > 0.0 {
                1.0 - lr * self.hp.weight_decay
            } else {
                1.0
            };
            let s = crate::ops::optim::AdamStep {
                lr,
                beta1: self.hp.beta1,
                beta2: self.hp.beta2,
                bc1,
                bc2,
                eps: self.hp.eps,
                decay,
                gscale: grad_scale,
            };
            crate::ops::optim::adamw(p.var.as_tensor(), g, m, v, &s, casts.get(k).and_then(Option::as_ref))?;
        }
        Ok(())
    }

    /// Bias corrections (1 − β₁ᵗ, 1 − β₂ᵗ) of step `self.t`.
    fn corrections(&self) -> (f64, f64) {
        (1.0 - self.hp.beta1.powi(self.t as i32), 1.0 - self.hp.beta2.powi(self.t as i32))
    }

    /// The update of step `self.t` from tensor ops (any device; the fused kernel's slow twin).
    pub fn step_ops(&mut self, params: &[Param], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let AdamWParams {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay,
        } = self.hp;
        let (bc1, bc2) = self.corrections();
        for ((p, g), (m, v)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?; // m ← β₁m + (1−β₁)g
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?; // v ← β₂v + (1−β₂)g²
            let denom = ((&*v / bc2)?.sqrt()? + eps)?; // √v̂ + ε
            let upd = ((&*m / bc1)? / denom)?; // m̂ / (√v̂ + ε)
            let w = p.var.as_tensor();
            let decayed = if p.decay && weight_decay > 0.0 {
                (w * (1.0 - lr * weight_decay))?
            } else {
                w.clone()
            };
            let new = (decayed - (upd * lr)?)?;
            p.var.set(&new.detach())?;
        }
        Ok(())
    }
}

/// Learning rate at step `s` (0-based, the step about to be taken): linear warmup to `lr` over
/// `warmup` steps, then a cosine from `lr` down to `lr · min_ratio` at the last step.
pub fn lr_at(s: usize, total: usize, lr: f64, warmup: usize, min_ratio: f64) -> f64 {
    if s < warmup {
        return lr * (s + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).saturating_sub(1).max(1);
    let progress = ((s - warmup) as f64 / span as f64).min(1.0);
    let min = lr * min_ratio;
    min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The global L2 norm of a list of gradients (one host sync); `fused`: by the CUDA kernel where
/// the gradients are on a GPU.
pub fn global_norm(grads: &[Tensor], fused: bool) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if fused && grads.iter().all(|g| g.device().is_cuda()) {
        return Ok(crate::ops::optim::sum_squares(grads)?.sqrt());
    }
    let _ = fused;
    global_norm_ops(grads)
}

/// [`global_norm`] from tensor ops (the fused kernel's slow twin).
pub fn global_norm_ops(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(total).sqrt())
}

/// The factor that brings a gradient of norm `norm` down to `clip` (1 when off or below).
pub fn clip_scale(norm: f64, clip: f64) -> f64 {
    if clip > 0.0 && norm > clip {
        clip / (norm + 1e-6)
    } else {
        1.0
    }
}
