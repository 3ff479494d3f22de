//! The trainable tensors of a run: LoRA adapters put on the target linears, or f32 master copies
//! of the tensors the method trains (the model keeps a cast where it computes in bf16).

use std::collections::HashMap;

use candle_core::{DType, Var};

use crate::error::Result;
use crate::finetune::lora::{attach, init_adapter, visit_named_linears, LinearKind};
use crate::finetune::optim::{decays, Param};
use crate::finetune::{FinetuneConfig, Method};
use crate::model::Model;
use crate::rng::Rng;

/// Params the model holds as a cast: name -> (param index, model dtype).
pub type Casts = HashMap<String, (usize, DType)>;

/// Makes the trainable tensors of `cfg.method` and puts them (or their casts) into `model`.
pub fn make_params(model: &mut Model, cfg: &FinetuneConfig) -> Result<(Vec<Param>, Casts)> {
    let mut params = Vec::new();
    let mut casts = HashMap::new();
    if cfg.method == Method::Lora {
        let mut rng = Rng::new(cfg.seed ^ 0x10AA);
        let device = model.device.clone();
        let scale = cfg.alpha / cfg.rank as f64;
        visit_named_linears(model, &mut |name, kind, l| {
            let LinearKind::Target(t) = kind else { return Ok(()) };
            if !cfg.targets.contains(&t) {
                return Ok(());
            }
            let (out, inp) = l.weight.dims2()?;
            let (a, b) = init_adapter(out, inp, cfg.rank.min(out.min(inp)).max(1), &mut rng, &device)?;
            let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            attach(name, l, va.as_tensor().clone(), vb.as_tensor().clone(), scale)?;
            for (suffix, var) in [("lora_a", va), ("lora_b", vb)] {
                let n = format!("{name}.{suffix}");
                params.push(Param { decay: true, name: n, var });
            }
            Ok(())
        })?;
    }
    let replace = |name: &str| match cfg.method {
        Method::Full => true,
        Method::Router => name.contains(".router."),
        Method::Lora => cfg.train_router && name.contains(".router."),
    };
    model.visit_mut(&mut |name, t| {
        if !replace(name) || name.ends_with(".lora_a") || name.ends_with(".lora_b") {
            return Ok(());
        }
        let var = Var::from_tensor(&t.detach().to_dtype(DType::F32)?)?;
        let dt = t.dtype();
        if dt == DType::F32 {
            *t = var.as_tensor().clone();
        } else {
            casts.insert(name.to_string(), (params.len(), dt));
        }
        params.push(Param {
            name: name.to_string(),
            decay: decays(name),
            var,
        });
        Ok(())
    })?;
    Ok((params, casts))
}
