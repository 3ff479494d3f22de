//! The trainer on tiny models (CPU): loss falls, resume equals an uninterrupted run, adapters
//! round-trip through disk and merging, bad data lines, the NaN guard, evaluation.

#![allow(clippy::unwrap_used)]

mod ft_common;

use std::path::Path;

use blackmamba::finetune::adapter;
use blackmamba::finetune::data::{self, DataFormat, Example};
use blackmamba::finetune::loss::evaluate;
use blackmamba::finetune::metrics;
use blackmamba::finetune::{FinetuneConfig, Method, Trainer};
use blackmamba::model::{Logits, Model};
use candle_core::{DType, Device, Tensor, D};
use ft_common::{byte_tokenizer, config, model, run_config, write, TEXT};

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    let mut st = m.new_state(1).unwrap();
    m.forward(
        &Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap(),
        &mut st,
        Logits::All,
        None,
    )
    .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn run(base: &Model, cfg: FinetuneConfig, steps: usize) -> (Trainer, Vec<f64>) {
    let mut t = Trainer::new(base, &byte_tokenizer(), cfg).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(t.step().unwrap().loss);
    }
    (t, losses)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn loss_falls_on_a_small_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", &TEXT.repeat(4));
    // LoRA needs a base whose (frozen, tied) embedding can express sharp logits
    for (method, lr, perturb) in [(Method::Full, 3e-3, false), (Method::Lora, 1e-2, true)] {
        let base = model(&config(&["r", "4", "r", "4"], 32), 1, perturb);
        let mut cfg = run_config(data.clone(), dir.path().join(method.name()), method, 30);
        cfg.lr = lr;
        let (t, losses) = run(&base, cfg, 30);
        let (first, last) = (mean(&losses[..3]), mean(&losses[losses.len() - 3..]));
        assert!(last < 0.75 * first, "{method:?}: loss {first:.3} -> {last:.3}");
        let ev = t.eval().unwrap().unwrap();
        assert!(ev.loss.is_finite() && (ev.perplexity - ev.loss.exp()).abs() < 1e-9 * ev.perplexity);
    }
}

#[test]
fn reports_carry_routing_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "chat.jsonl", &ft_common::chat_jsonl());
    let base = model(&config(&["r", "4", "r", "3"], 16), 2, false);
    let mut cfg = run_config(data, dir.path().join("out"), Method::Lora, 3);
    cfg.grad_accum = 2;
    cfg.eval_every = 2;
    let mut t = Trainer::new(&base, &byte_tokenizer(), cfg).unwrap();
    let r1 = t.step().unwrap();
    assert_eq!((r1.step, r1.total_steps), (1, 3));
    assert_eq!(r1.expert_load.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 3]);
    // every input position (padding included) is routed once per micro-batch, in each layer
    let per_layer: Vec<usize> = r1.expert_load.iter().map(|l| l.iter().sum()).collect();
    assert_eq!(per_layer[0], per_layer[1]);
    assert!(per_layer[0] > 0);
    assert_eq!(r1.sinkhorn.len(), 2);
    assert_eq!(r1.sinkhorn_iters, r1.sinkhorn.iter().map(|s| s.iters()).collect::<Vec<_>>());
    assert!(r1.sinkhorn_iters.iter().all(|&i| i >= 1));
    assert!(r1.grad_norm > 0.0 && r1.tokens_per_s > 0.0 && r1.lr > 0.0);
    assert_eq!(r1.eval_loss, None);
    let r2 = t.step().unwrap();
    assert!(r2.eval_loss.is_some(), "eval_every 2");
    let r3 = t.step().unwrap();
    assert!(r3.eval_loss.is_some(), "the last step evaluates");
    assert!(t.done());
    assert!(t.step().is_err());
    let lines = metrics::read(&dir.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(lines.iter().map(|l| l.step).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(lines[0].loss, Some(r1.loss));
    assert_eq!(lines[1].eval_loss, r2.eval_loss);
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "chat.jsonl", &ft_common::chat_jsonl());
    let base = model(&config(&["r", "4", "r", "4"], 16), 3, true);
    let mk = |out: &str| {
        let mut c = run_config(data.clone(), dir.path().join(out), Method::Lora, 8);
        c.train_router = true;
        c.grad_accum = 2;
        c.batch = 3;
        c.eval_every = 3;
        c
    };
    let (_, full) = run(&base, mk("a"), 8);

    let (mut t, mut resumed) = run(&base, mk("b"), 5);
    t.save().unwrap();
    drop(t);
    // a fresh run does not overwrite a checkpoint
    let err = Trainer::new(&base, &byte_tokenizer(), mk("b")).err().unwrap().to_string();
    assert!(err.contains("already holds a checkpoint") && err.contains("--resume"), "{err}");
    let mut cfg = mk("b");
    cfg.resume = Some(dir.path().join("b"));
    let (_, rest) = run(&base, cfg, 3);
    resumed.extend(rest);
    assert_eq!(full, resumed, "loss curves differ");
    let steps: Vec<usize> = metrics::read(&dir.path().join("b/metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|l| l.step)
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

#[test]
fn full_training_resumes_and_saves_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", &TEXT.repeat(2));
    let base = model(&config(&["r", "4"], 16), 4, false);
    let mk = || run_config(data.clone(), dir.path().join("out"), Method::Full, 4);
    let (_, full) = run(&base, mk(), 4);
    let (mut t, mut resumed) = run(&base, mk(), 2);
    t.save().unwrap();
    let mut cfg = mk();
    cfg.resume = Some(dir.path().join("out"));
    let (mut t, rest) = run(&base, cfg, 2);
    resumed.extend(rest);
    assert_eq!(full, resumed);
    t.save().unwrap();
    // the folder is a model folder too
    let (loaded, tok) = blackmamba::loader::load_dir(&dir.path().join("out"), &Device::Cpu, DType::F32).unwrap();
    assert!(tok.is_some());
    let ids = [5, 9, 2, 77, 14];
    assert!(max_abs(&logits(&loaded, &ids), &logits(&t.model().unwrap(), &ids)) < 1e-5);
}

#[test]
fn adapter_save_load_merge_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "chat.jsonl", &ft_common::chat_jsonl());
    let cfg_m = config(&["r", "4", "r", "1"], 16);
    let base = model(&cfg_m, 5, true);
    let mut cfg = run_config(data, dir.path().join("ad"), Method::Lora, 4);
    cfg.train_router = true;
    cfg.lr = 2e-2;
    let (mut t, _) = run(&base, cfg, 4);
    t.save().unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 250) as u32 + 1).collect();
    let trained = logits(&t.model().unwrap(), &ids);
    assert!(max_abs(&trained, &logits(&base, &ids)) > 1e-3, "the adapter changed nothing");

    // base + adapter from disk
    let mut with = base.clone();
    let meta = adapter::apply(&mut with, &dir.path().join("ad")).unwrap();
    assert_eq!((meta.step, meta.rank, meta.method), (4, 4, Method::Lora));
    assert!(max_abs(&logits(&with, &ids), &trained) < 1e-6);

    // merged into the weights, written and read back
    with.save_dir(&dir.path().join("merged"), DType::F32).unwrap();
    let (merged, _) = blackmamba::loader::load_dir(&dir.path().join("merged"), &Device::Cpu, DType::F32).unwrap();
    let d = max_abs(&logits(&merged, &ids), &trained);
    assert!(d < 1e-4, "merged logits differ by {d}");

    // an adapter does not fit another shape
    let other = model(&config(&["r", "4", "r", "1"], 24), 5, true);
    let err = adapter::apply(&mut other.clone(), &dir.path().join("ad")).unwrap_err().to_string();
    assert!(err.contains("hidden_size"), "{err}");
}

#[test]
fn router_method_changes_only_routers() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", TEXT);
    let base = model(&config(&["r", "4", "r", "4"], 16), 6, false);
    let (t, _) = run(&base, run_config(data, dir.path().join("r"), Method::Router, 3), 3);
    let after = t.model().unwrap().named_tensors().unwrap();
    let before = base.named_tensors().unwrap();
    for ((n, a), (_, b)) in after.iter().zip(&before) {
        let changed = max_abs(a, b) > 0.0;
        assert_eq!(changed, n.contains(".router."), "{n}");
    }
}

#[test]
fn bad_jsonl_lines_are_reported_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer();
    let lines = [
        r#"{"prompt": "Hi", "response": "Hello."}"#,
        r#"{"prompt": "Hi""#,
        r#"{"prompt": "Hi"}"#,
        "",
        r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": "only a question"}]}"#,
        r#"[1, 2]"#,
        r#"{"prompt": 3, "response": "x"}"#,
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
        r#"{"text": "plain words"}"#,
        r#"{"other": 1}"#,
    ];
    let p = write(dir.path(), "d.jsonl", &lines.join("\n"));
    let ds = data::load(&p, DataFormat::Auto, &tok, 64, ft_common::VOCAB).unwrap();
    assert_eq!(ds.examples.len(), 3);
    let got: Vec<(usize, &str)> = ds.bad.iter().map(|b| (b.line, b.reason.as_str())).collect();
    let want = [
        (2, "not valid JSON"),
        (3, "no \"response\""),
        (5, "unknown role 'wizard'"),
        (6, "no assistant message"),
        (7, "expected a JSON object"),
        (8, "\"prompt\" must be a string"),
        (11, "expected {\"prompt\""),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for ((line, reason), (wl, wr)) in got.iter().zip(want) {
        assert_eq!(*line, wl);
        assert!(reason.contains(wr), "line {line}: {reason}");
    }
    // loss only on the assistant's text (and its eos) for chat lines
    let ex = &ds.examples[0];
    let learned: Vec<u32> = ex.ids.iter().zip(&ex.mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
    assert_eq!(blackmamba::tokenizer::decode(&tok, &learned).unwrap(), " Hello.");
    assert_eq!(learned.last(), Some(&blackmamba::tokenizer::EOS_ID));

    // too short a --seq-len leaves nothing to learn from
    let short = data::load(&p, DataFormat::Jsonl, &tok, 4, ft_common::VOCAB).unwrap();
    assert!(short.bad.iter().any(|b| b.line == 1 && b.reason.contains("--seq-len")));

    let all_bad = write(dir.path(), "bad.jsonl", "{\n[]\n");
    let err = data::load(&all_bad, DataFormat::Auto, &tok, 64, ft_common::VOCAB)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no usable training example") && err.contains("line 1"), "{err}");
    let empty = write(dir.path(), "empty.txt", "");
    assert!(data::load(&empty, DataFormat::Auto, &tok, 64, ft_common::VOCAB).is_err());
    let err = data::load(&dir.path().join("missing.txt"), DataFormat::Auto, &tok, 64, ft_common::VOCAB).unwrap_err();
    assert!(err.to_string().contains("missing.txt"));
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", TEXT);
    let base = model(&config(&["r", "4"], 16), 7, false);
    let out = dir.path().join("out");
    let (mut t, _) = run(&base, run_config(data.clone(), out.clone(), Method::Lora, 6), 2);
    t.save().unwrap();
    drop(t);
    let snapshot = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "metrics.jsonl")
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&out);

    // a base whose embedding holds a NaN: the loss of the next step is NaN
    let mut poisoned = base.clone();
    poisoned
        .visit_mut(&mut |n, t| {
            if n == "embedding.word_embeddings.weight" {
                let mut v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                v.iter_mut().for_each(|x| *x = f32::NAN);
                *t = Tensor::from_vec(v, t.dims(), t.device())?;
            }
            Ok(())
        })
        .unwrap();
    let mut cfg = run_config(data, out.clone(), Method::Lora, 6);
    cfg.resume = Some(out.clone());
    let mut t = Trainer::new(&poisoned, &byte_tokenizer(), cfg).unwrap();
    let err = t.step().unwrap_err().to_string();
    assert!(err.contains("NaN") && err.contains("step 2") && err.contains("kept"), "{err}");
    assert!(t.step().is_err());
    assert!(t.save().is_err());
    assert_eq!(snapshot(&out), before, "the checkpoint changed");
}

#[test]
fn eval_loss_is_the_mean_token_cross_entropy() {
    let tok = byte_tokenizer();
    let m = model(&config(&["r", "4", "r", "4"], 16), 8, true);
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "chat.jsonl", &ft_common::chat_jsonl());
    let ds = data::load(&p, DataFormat::Auto, &tok, 64, ft_common::VOCAB).unwrap();
    let ex: Vec<Example> = ds.examples.into_iter().take(5).collect();
    let got = evaluate(&m, &ex, 2).unwrap();
    // by hand: one sequence at a time, full logits, log-softmax on the host
    let (mut sum, mut n) = (0f64, 0usize);
    for e in &ex {
        let lp = candle_nn::ops::log_softmax(&logits(&m, &e.ids[..e.ids.len() - 1]).squeeze(0).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for t in 1..e.ids.len() {
            if e.mask[t] {
                sum -= f64::from(lp[t - 1][e.ids[t] as usize]);
                n += 1;
            }
        }
    }
    assert_eq!(got.tokens, n);
    assert!((got.loss - sum / n as f64).abs() < 1e-4, "{} vs {}", got.loss, sum / n as f64);
    assert!((got.perplexity - got.loss.exp()).abs() < 1e-9 * got.perplexity);
}

#[test]
fn bf16_model_trains_f32_masters() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", &TEXT.repeat(2));
    let cfg_m = config(&["r", "4"], 16);
    let w = blackmamba::model::random::random_weights(
        &cfg_m,
        blackmamba::model::random::RandomInit { seed: 9, perturb: false },
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let base = Model::from_tensors(&cfg_m, w, DType::BF16, &Device::Cpu).unwrap();
    let mut cfg = run_config(data, dir.path().join("out"), Method::Full, 12);
    cfg.lr = 1e-2;
    let (mut t, losses) = run(&base, cfg, 12);
    assert!(mean(&losses[9..]) < mean(&losses[..3]), "{losses:?}");
    // the served model keeps the base dtypes; the checkpoint holds the f32 masters
    let m = t.model().unwrap();
    for ((n, a), (_, b)) in m.named_tensors().unwrap().iter().zip(base.named_tensors().unwrap()) {
        assert_eq!(a.dtype(), b.dtype(), "{n}");
    }
    t.save().unwrap();
    let st = blackmamba::model::weights::read_tensors(
        &blackmamba::model::weights::WeightFiles::Safetensors(vec![dir.path().join("out/model.safetensors")]),
        &Device::Cpu,
    )
    .unwrap();
    assert!(st.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn schedule_clipping_and_adamw_by_hand() {
    use blackmamba::finetune::optim::{clip_scale, decays, global_norm, lr_at, AdamW, AdamWParams, Param};
    // warmup 4 to 1e-3, cosine to 1e-4 at the last of 20 steps
    let lrs: Vec<f64> = (0..20).map(|s| lr_at(s, 20, 1e-3, 4, 0.1)).collect();
    assert!((lrs[0] - 2.5e-4).abs() < 1e-12 && (lrs[3] - 1e-3).abs() < 1e-12);
    assert!((lrs[4] - 1e-3).abs() < 1e-12 && (lrs[19] - 1e-4).abs() < 1e-12);
    assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]));
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert!((clip_scale(4.0, 1.0) * 4.0 - 1.0).abs() < 1e-6);
    assert_eq!(clip_scale(4.0, 0.0), 1.0);
    assert!(!decays("decoder.layers.0.mixer.A_log") && !decays("decoder.layers.0.mixer.D"));
    assert!(!decays("decoder.layers.1.norm.weight") && !decays("decoder.layers.0.mixer.dt_proj.bias"));
    assert!(decays("decoder.layers.0.mixer.in_proj.weight") && decays("x.in_proj.lora_a"));

    let g = Tensor::new(&[3.0f32, -4.0], &Device::Cpu).unwrap();
    assert!((global_norm(std::slice::from_ref(&g), true).unwrap() - 5.0).abs() < 1e-6);
    let var = candle_core::Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let params = vec![Param {
        name: "w".into(),
        var: var.clone(),
        decay: true,
    }];
    let hp = AdamWParams {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(&params, hp).unwrap();
    opt.step(&params, std::slice::from_ref(&g), 0.01, 0.5, &[]).unwrap();
    opt.step(&params, &[g], 0.01, 0.5, &[]).unwrap();
    // by hand, per element: g' = 0.5 g; two steps with the same gradient give m̂ = g', v̂ = g'²
    let want: Vec<f32> = [(1.0f64, 3.0f64), (2.0, -4.0)]
        .iter()
        .map(|&(w0, gr)| {
            let gs = 0.5 * gr;
            let step = |w: f64| w * (1.0 - 0.01 * 0.1) - 0.01 * gs / (gs.abs() + 1e-8);
            step(step(w0)) as f32
        })
        .collect();
    let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn the_trainer_can_move_to_an_engine_thread() {
    fn send<T: Send>() {}
    send::<Trainer>();
    send::<blackmamba::finetune::StepReport>();
}
