//! Gradients of the whole model (every tensor, LoRA adapters too) against central finite
//! differences, through the differentiable path with Sinkhorn routing.

#![allow(clippy::unwrap_used)]

mod ft_common;

use blackmamba::finetune::data::{text_examples, Batch, Example};
use blackmamba::finetune::lora::{attach, init_adapter, visit_named_linears};
use blackmamba::finetune::loss::{batch_nll, nll_sum};
use blackmamba::model::moe::Routing;
use blackmamba::model::probe::Probe;
use blackmamba::model::Model;
use blackmamba::rng::Rng;
use blackmamba::sinkhorn::SinkhornOpts;
use candle_core::{DType, Device, Tensor, Var};

/// The model with every tensor a Var; returns them by name.
fn all_vars(m: &mut Model) -> Vec<(String, Var)> {
    let mut vars = Vec::new();
    m.visit_mut(&mut |n, t| {
        let v = Var::from_tensor(&t.detach()).unwrap();
        *t = v.as_tensor().clone();
        vars.push((n.to_string(), v));
        Ok(())
    })
    .unwrap();
    vars
}

/// Loss (summed in f64 from the f32 logits, to keep rounding out of the differences) and the
/// experts chosen in every MoE layer.
fn loss_and_routes(m: &Model, batch: &Batch) -> (Tensor, Vec<Vec<u32>>) {
    let mut probe = Probe {
        moe_only: true,
        ..Probe::default()
    };
    let mut st = m.new_state(batch.ids.dim(0).unwrap()).unwrap();
    let logits = m.forward_rows(&batch.ids, &mut st, &batch.rows, Some(&mut probe)).unwrap();
    let l = nll_sum(&logits.to_dtype(DType::F64).unwrap(), &batch.targets, true).unwrap();
    (l, probe.moe.iter().map(|r| r.experts.clone()).collect())
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// For each var: the directional derivative along a random direction by central differences
/// (routing held fixed: the step shrinks until no route changes) vs the autograd gradient.
fn check(m: &Model, vars: &[(String, Var)], batch: &Batch, seed: u64) -> usize {
    let (_, routes) = loss_and_routes(m, batch);
    // the gradient of the library's training loss (f32)
    let grads = batch_nll(m, batch, None).unwrap().backward().unwrap();
    let mut rng = Rng::new(seed);
    let mut checked = 0;
    for (name, var) in vars {
        let w0 = var.as_tensor().detach().copy().unwrap();
        let n = w0.elem_count();
        let dir: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let dir = Tensor::from_vec(dir, w0.dims(), &Device::Cpu).unwrap();
        let g = grads
            .get(var.as_tensor())
            .map(|g| g.detach())
            .unwrap_or_else(|| w0.zeros_like().unwrap());
        let analytic = scalar(&(&g * &dir).unwrap().sum_all().unwrap());
        // a step of about 1e-2 of the tensor's scale per element
        let scale = (scalar(&w0.sqr().unwrap().mean_all().unwrap()).sqrt()).max(1e-2);
        let mut eps = 1e-2 * scale;
        let mut fd = None;
        for _ in 0..6 {
            // central differences at eps and eps/2, Richardson-extrapolated (error O(eps⁴))
            let mut quotients = Vec::new();
            for h in [eps, eps / 2.0] {
                var.set(&(&w0 + (&dir * h).unwrap()).unwrap()).unwrap();
                let (lp, rp) = loss_and_routes(m, batch);
                var.set(&(&w0 - (&dir * h).unwrap()).unwrap()).unwrap();
                let (lm, rm) = loss_and_routes(m, batch);
                var.set(&w0).unwrap();
                if rp != routes || rm != routes {
                    break;
                }
                quotients.push((scalar(&lp) - scalar(&lm)) / (2.0 * h));
            }
            if let [q1, q2] = quotients[..] {
                fd = Some((4.0 * q2 - q1) / 3.0);
                break;
            }
            eps /= 4.0;
        }
        let Some(fd) = fd else {
            panic!("{name}: routing changes under every step size")
        };
        let tol = 1e-2 * analytic.abs().max(fd.abs()) + 2e-3;
        assert!(
            (fd - analytic).abs() <= tol,
            "{name}: finite difference {fd:.6} vs autograd {analytic:.6} (eps {eps:e})"
        );
        checked += 1;
    }
    checked
}

fn batch_of(text: &str, seq_len: usize, n: usize) -> Batch {
    let tok = ft_common::byte_tokenizer();
    let ex = text_examples(text, &tok, seq_len).unwrap();
    let refs: Vec<&Example> = ex.iter().take(n).collect();
    Batch::new(&refs, &Device::Cpu).unwrap()
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let mut m = ft_common::model(&cfg, 3, true);
    m.differentiable = true;
    m.routing = Routing::Sinkhorn(SinkhornOpts::default());
    let vars = all_vars(&mut m);
    let batch = batch_of(ft_common::TEXT, 12, 3);
    assert_eq!(check(&m, &vars, &batch, 11), vars.len());
    // a sequence longer than one scan chunk (64): h is carried across the chunk border
    let long = batch_of(ft_common::TEXT, 70, 1);
    assert_eq!(long.ids.dim(1).unwrap(), 70);
    assert_eq!(check(&m, &vars, &long, 12), vars.len());
    // every kind of tensor was among them
    for part in [
        "embedding",
        "norm.weight",
        "in_proj",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        ".D",
        "out_proj",
        "router.weight",
        "router.bias",
        "linear_fc1",
        "linear_fc2",
        "final_layernorm.bias",
    ] {
        assert!(vars.iter().any(|(n, _)| n.contains(part)), "{part} not checked");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let cfg = ft_common::config(&["r", "4", "r", "4"], 16);
    let mut m = ft_common::model(&cfg, 5, true);
    m.differentiable = true;
    m.routing = Routing::Sinkhorn(SinkhornOpts::default());
    let mut rng = Rng::new(9);
    let mut vars = Vec::new();
    visit_named_linears(&mut m, &mut |name, _, l| {
        let (o, i) = l.weight.dims2()?;
        let (a, _) = init_adapter(o, i, 2, &mut rng, &Device::Cpu)?;
        // a non-zero B so that A gets a gradient too
        let b = (init_adapter(1, 2, o, &mut rng, &Device::Cpu)?.0 * 0.5)?; // (out, rank)
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        attach(name, l, va.as_tensor().clone(), vb.as_tensor().clone(), 2.0)?;
        vars.push((format!("{name}.lora_a"), va));
        vars.push((format!("{name}.lora_b"), vb));
        Ok(())
    })
    .unwrap();
    let batch = batch_of(ft_common::TEXT, 12, 3);
    assert_eq!(check(&m, &vars, &batch, 13), vars.len());
}

#[test]
fn fused_cross_entropy_matches_its_tensor_op_twin() {
    use blackmamba::finetune::loss::nll_sum_slow;
    let mut rng = Rng::new(21);
    let (n, v) = (37, 301);
    let x: Vec<f32> = (0..n * v).map(|_| (3.0 * rng.normal()) as f32).collect();
    let t: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    let x = Var::from_vec(x, (n, v), &Device::Cpu).unwrap();
    let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
    let fast = nll_sum(x.as_tensor(), &t, true).unwrap();
    let slow = nll_sum_slow(x.as_tensor(), &t).unwrap();
    let (a, b) = (scalar(&fast), scalar(&slow));
    assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
    let ga = fast.backward().unwrap().get(x.as_tensor()).unwrap().clone();
    let gb = slow.backward().unwrap().get(x.as_tensor()).unwrap().clone();
    let d = scalar(
        &(ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap(),
    );
    assert!(d < 1e-6, "gradients differ by {d}");
    // a target outside the classes is an error, not a panic
    let bad = Tensor::from_vec(vec![v as u32; n], n, &Device::Cpu).unwrap();
    assert!(nll_sum(x.as_tensor(), &bad, true).is_err());
}
