#![allow(clippy::unwrap_used)]
//! Fine-tuning through the engine thread (CPU, tiny model, byte tokenizer): the panel's commands
//! drive the same trainer as `blackmamba finetune` and its events reach the UI; chat switches to
//! the fine-tuned weights and back; errors leave the engine running.

mod engine_common;
mod ft_common;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use blackmamba::engine::protocol::{
    CancelFlag, Command, EngineEvent, FinetuneCommand, FinetuneEvent, FinetuneMethod, FinetuneProgress, FinetuneSpec, FinetuneStatus,
    ProbeRouting, SinkhornOrigin, SinkhornReport, TokenRec,
};
use blackmamba::engine::{Engine, Source};
use blackmamba::model::Model;
use blackmamba::sampling::SamplingParams;
use ft_common::{byte_tokenizer, config, model, write, TEXT};

const WAIT: Duration = Duration::from_secs(120);

fn engine_with(m: Model) -> (Engine, Receiver<EngineEvent>) {
    let (e, rx, first) = engine_common::spawn(m, byte_tokenizer(), WAIT);
    match first {
        EngineEvent::Loaded(info) => assert!(info.finetune_available),
        other => panic!("expected Loaded, got {other:?}"),
    }
    (e, rx)
}

/// A perturbed tiny model (LoRA needs a base whose frozen embedding can express sharp logits).
fn engine() -> (Engine, Receiver<EngineEvent>) {
    engine_with(model(&config(&["r", "4", "r", "4"], 32), 1, true))
}

fn spec(data: PathBuf, out: PathBuf, steps: usize) -> FinetuneSpec {
    FinetuneSpec {
        data,
        method: FinetuneMethod::Lora,
        targets: vec!["all".into()],
        rank: 4,
        alpha: 8.0,
        lr: 1e-2,
        steps,
        seq_len: 32,
        batch: 4,
        out,
    }
}

fn ft(e: &Engine, c: FinetuneCommand) {
    assert!(e.send(Command::Finetune(c)));
}

/// Events up to and including the first one `stop` accepts.
fn until(rx: &Receiver<EngineEvent>, stop: impl Fn(&EngineEvent) -> bool) -> Vec<EngineEvent> {
    engine_common::until(rx, WAIT, stop)
}

fn is_status(ev: &EngineEvent, s: FinetuneStatus) -> bool {
    matches!(ev, EngineEvent::Finetune(FinetuneEvent::Status(x)) if *x == s)
}

fn is_error(ev: &EngineEvent) -> bool {
    matches!(ev, EngineEvent::Error { .. })
}

fn error_of(evs: &[EngineEvent]) -> String {
    match evs.last() {
        Some(EngineEvent::Error { id: None, message }) => message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn progress(evs: &[EngineEvent]) -> Vec<FinetuneProgress> {
    evs.iter()
        .filter_map(|e| match e {
            EngineEvent::Finetune(FinetuneEvent::Progress(p)) => Some((**p).clone()),
            _ => None,
        })
        .collect()
}

fn sinkhorn(evs: &[EngineEvent]) -> Vec<SinkhornReport> {
    evs.iter()
        .filter_map(|e| match e {
            EngineEvent::Sinkhorn(r) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

fn probes(evs: &[EngineEvent]) -> Vec<ProbeRouting> {
    evs.iter()
        .filter_map(|e| match e {
            EngineEvent::Finetune(FinetuneEvent::ProbeRouting(r)) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// No fine-tuning progress for a while.
fn assert_quiet(rx: &Receiver<EngineEvent>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(400)) {
            Err(RecvTimeoutError::Timeout) => return,
            Ok(EngineEvent::Finetune(FinetuneEvent::Progress(p))) => panic!("a step ran while it should not: {p:?}"),
            Ok(EngineEvent::Sinkhorn(_)) => panic!("a step ran while it should not"),
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        max_tokens,
        ..Default::default()
    }
}

/// A fresh chat of one turn: the prompt's telemetry and the answer's ids.
fn fresh_chat(e: &Engine, rx: &Receiver<EngineEvent>, id: u64) -> (Vec<TokenRec>, Vec<u32>) {
    e.send(Command::NewChat { system: None });
    e.send(Command::Chat {
        id,
        text: "Where did the dog sit?".into(),
        params: greedy(8),
        cancel: CancelFlag::new(),
    });
    let evs = until(rx, |e| matches!(e, EngineEvent::Done { .. } | EngineEvent::Error { .. }));
    assert!(matches!(evs.last(), Some(EngineEvent::Done { .. })), "{:?}", evs.last());
    let mut prompt = vec![];
    let mut ids = vec![];
    for ev in evs {
        match ev {
            EngineEvent::Prompt { tokens, .. } => prompt.extend(tokens),
            EngineEvent::Token { rec, .. } => ids.push(rec.id),
            _ => {}
        }
    }
    (prompt, ids)
}

fn adapter_step(out: &Path) -> u64 {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter.json")).unwrap()).unwrap();
    meta["step"].as_u64().unwrap()
}

#[test]
fn a_run_pauses_resumes_finishes_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", &TEXT.repeat(4));
    let out = dir.path().join("run");
    let (e, rx) = engine();
    ft(&e, FinetuneCommand::Start(Box::new(spec(data, out.clone(), 30))));
    let mut evs = until(&rx, |ev| is_status(ev, FinetuneStatus::Running) || is_error(ev));
    assert!(!is_error(evs.last().unwrap()), "{:?}", evs.last());
    // the base model routes the probe prompt first
    let before = probes(&evs);
    assert_eq!(before.len(), 1);
    assert!(!before[0].after);
    assert_eq!(before[0].experts.len(), 2, "one row per MoE layer");
    assert!(before[0].experts.iter().all(|r| r.len() == before[0].pieces.len() && !r.is_empty()));
    assert!(evs.iter().any(|e| matches!(e, EngineEvent::Notice(n) if n.contains("held-out"))));

    // a few steps, then pause: no step runs while paused
    evs.extend(until(&rx, |ev| {
        progress(std::slice::from_ref(ev)).first().is_some_and(|p| p.step == 3)
    }));
    ft(&e, FinetuneCommand::Pause);
    evs.extend(until(&rx, |ev| is_status(ev, FinetuneStatus::Paused)));
    assert_quiet(&rx);

    // chat still works while a run is paused
    let (_, ids) = fresh_chat(&e, &rx, 1);
    assert!(!ids.is_empty());

    ft(&e, FinetuneCommand::Resume);
    evs.extend(until(&rx, |ev| is_status(ev, FinetuneStatus::Finished) || is_error(ev)));
    evs.extend(until(&rx, |ev| matches!(ev, EngineEvent::Finetune(FinetuneEvent::Saved(_)))));
    match evs.last() {
        Some(EngineEvent::Finetune(FinetuneEvent::Saved(p))) => assert_eq!(p, &out),
        other => panic!("{other:?}"),
    }

    let ps = progress(&evs);
    assert_eq!(ps.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    assert!(ps.iter().all(|p| p.total_steps == 30 && p.tokens_per_s > 0.0 && p.loss.is_finite()));
    let losses: Vec<f64> = ps.iter().map(|p| p.loss).collect();
    let (first, last) = (mean(&losses[..3]), mean(&losses[27..]));
    assert!(last < 0.75 * first, "loss {first:.3} -> {last:.3}");
    // an evaluation every tenth of the run, and at the end
    let evals: Vec<usize> = ps.iter().filter(|p| p.eval_loss.is_some()).map(|p| p.step).collect();
    assert_eq!(evals, (1..=10).map(|k| 3 * k).collect::<Vec<_>>());
    // the ETA's clock counts time spent in steps only
    assert!(ps.windows(2).all(|w| w[1].elapsed_secs > w[0].elapsed_secs));
    assert!(ps.iter().all(|p| p.expert_load.len() == 2 && p.sinkhorn_iters.len() == 2));

    // every step's training batch reaches the Sinkhorn view
    let sk = sinkhorn(&evs);
    assert_eq!(sk.len(), 30);
    for (r, p) in sk.iter().zip(&ps) {
        assert_eq!(r.origin, SinkhornOrigin::Finetune { step: p.step });
        assert_eq!(r.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), vec![1, 3]);
        for ((l, load), &iters) in r.layers.iter().zip(&p.expert_load).zip(&p.sinkhorn_iters) {
            assert_eq!(l.greedy_loads.iter().sum::<usize>(), r.n_tokens);
            assert_eq!(l.runs.len(), 1);
            // one micro-batch per step: the balanced loads are the step's expert loads
            assert_eq!(&l.runs[0].loads, load);
            assert_eq!(l.runs[0].iters(), iters);
            assert!(l.runs[0].changed <= r.n_tokens);
        }
    }

    // probe routing after: on pause and at the end, by the fine-tuned weights
    let after = probes(&evs);
    assert!(after.len() >= 3 && after[1..].iter().all(|p| p.after));
    assert_eq!(after.last().unwrap().experts.len(), 2);

    // the adapter is on disk, at the last step
    for f in [
        "adapter.json",
        "adapter.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(adapter_step(&out), 30);
    // a finished run cannot be resumed, and its folder is not overwritten by a new run
    ft(&e, FinetuneCommand::Resume);
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("finished"), "{msg}");
    ft(
        &e,
        FinetuneCommand::Start(Box::new(spec(dir.path().join("text.txt"), out.clone(), 5))),
    );
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("already holds a checkpoint") && msg.contains("run"), "{msg}");
    e.shutdown();
}

#[test]
fn stop_then_save_and_chat_with_the_finetuned_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "chat.jsonl", &ft_common::chat_jsonl());
    let out = dir.path().join("stopped");
    let (e, rx) = engine();
    let (base_prompt, base_ids) = fresh_chat(&e, &rx, 1);

    ft(&e, FinetuneCommand::Start(Box::new(spec(data, out.clone(), 1000))));
    until(&rx, |ev| progress(std::slice::from_ref(ev)).first().is_some_and(|p| p.step == 8));
    ft(&e, FinetuneCommand::Stop);
    let evs = until(&rx, |ev| is_status(ev, FinetuneStatus::Stopped));
    let stopped_at = progress(&evs).last().map_or(8, |p| p.step);
    assert_quiet(&rx);
    assert!(!out.join("adapter.json").exists(), "stop does not save by itself");
    ft(&e, FinetuneCommand::Save);
    let evs = until(&rx, |ev| {
        matches!(ev, EngineEvent::Finetune(FinetuneEvent::Saved(_))) || is_error(ev)
    });
    assert!(!is_error(evs.last().unwrap()), "{:?}", evs.last());
    assert_eq!(adapter_step(&out), stopped_at as u64);
    assert!(out.join("adapter.safetensors").is_file());
    ft(&e, FinetuneCommand::Resume);
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("stopped"), "{msg}");

    // the fine-tuned weights answer differently; switching back gives exactly the base again
    ft(&e, FinetuneCommand::UseFinetuned(true));
    until(&rx, |ev| matches!(ev, EngineEvent::Finetune(FinetuneEvent::UsingFinetuned(true))));
    let (tuned_prompt, _) = fresh_chat(&e, &rx, 2);
    assert_eq!(tuned_prompt.len(), base_prompt.len());
    let diff = base_prompt
        .iter()
        .zip(&tuned_prompt)
        .flat_map(|(a, b)| a.ssm_norm.iter().zip(&b.ssm_norm).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "the fine-tuned weights change the state: max |Δ‖h‖| = {diff}");
    ft(&e, FinetuneCommand::UseFinetuned(false));
    until(&rx, |ev| matches!(ev, EngineEvent::Finetune(FinetuneEvent::UsingFinetuned(false))));
    let (again_prompt, again_ids) = fresh_chat(&e, &rx, 3);
    assert_eq!(again_prompt, base_prompt);
    assert_eq!(again_ids, base_ids);

    // the saved adapter on the base gives the same chat as the fine-tuned weights
    let mut with_adapter = model(&config(&["r", "4", "r", "4"], 32), 1, true);
    blackmamba::finetune::adapter::apply(&mut with_adapter, &out).unwrap();
    let (e2, rx2) = engine_with(with_adapter);
    let (adapter_prompt, _) = fresh_chat(&e2, &rx2, 1);
    for (a, b) in adapter_prompt.iter().zip(&tuned_prompt) {
        for (x, y) in a.ssm_norm.iter().zip(&b.ssm_norm) {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
    e2.shutdown();
    e.shutdown();
}

#[test]
fn bad_input_is_an_error_event_and_the_engine_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let (e, rx) = engine();
    let missing = dir.path().join("no-such-data.jsonl");
    ft(&e, FinetuneCommand::Start(Box::new(spec(missing, dir.path().join("o"), 5))));
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("no-such-data.jsonl"), "{msg}");

    let bad = write(dir.path(), "bad.jsonl", "{\"prompt\": \"no response\"}\nnot json\n");
    ft(&e, FinetuneCommand::Start(Box::new(spec(bad, dir.path().join("o"), 5))));
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("bad.jsonl") && msg.contains("line"), "{msg}");

    let data = write(dir.path(), "text.txt", TEXT);
    let mut s = spec(data, dir.path().join("o"), 5);
    s.targets = vec!["in_proj".into(), "mixer".into()];
    ft(&e, FinetuneCommand::Start(Box::new(s)));
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("'mixer'"), "{msg}");

    for (c, what) in [
        (FinetuneCommand::Pause, "pause"),
        (FinetuneCommand::Save, "save"),
        (FinetuneCommand::UseFinetuned(true), "chat with"),
    ] {
        ft(&e, c);
        let msg = error_of(&until(&rx, is_error));
        assert!(msg.starts_with(&format!("nothing to {what}")), "{msg}");
    }
    let (_, ids) = fresh_chat(&e, &rx, 9);
    assert!(!ids.is_empty());
    e.shutdown();
}

#[test]
fn a_nan_loss_stops_the_run_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "text.txt", TEXT);
    let mut poisoned = model(&config(&["r", "4"], 16), 7, false);
    poisoned
        .visit_mut(&mut |n, t| {
            if n == "embedding.word_embeddings.weight" {
                *t = (t.ones_like()? * f64::NAN)?;
            }
            Ok(())
        })
        .unwrap();
    let (e, rx) = engine_with(poisoned);
    let out = dir.path().join("nan");
    ft(&e, FinetuneCommand::Start(Box::new(spec(data, out.clone(), 5))));
    let evs = until(&rx, |ev| matches!(ev, EngineEvent::Finetune(FinetuneEvent::Failed(_))));
    assert!(evs.iter().any(|ev| is_status(ev, FinetuneStatus::Stopped)));
    assert!(progress(&evs).is_empty());
    match evs.last() {
        Some(EngineEvent::Finetune(FinetuneEvent::Failed(m))) => {
            assert!(m.contains("NaN") && m.contains("step 1") && m.contains("lower --lr"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert_quiet(&rx);
    ft(&e, FinetuneCommand::Save);
    let msg = error_of(&until(&rx, is_error));
    assert!(msg.contains("not saving"), "{msg}");
    assert!(!out.join("adapter.json").exists());
    e.shutdown();
}

#[test]
fn the_engine_loader_puts_the_adapter_on_the_model() {
    use blackmamba::engine::protocol::LoadSpec;
    use blackmamba::finetune::Trainer;
    let dir = tempfile::tempdir().unwrap();
    let base = model(&config(&["r", "4", "r", "4"], 32), 1, true);
    base.save_dir(&dir.path().join("model"), candle_core::DType::F32).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    byte_tokenizer().save(&tok_path, false).unwrap();
    let data = write(dir.path(), "text.txt", &TEXT.repeat(2));
    let ad = dir.path().join("adapter");
    let mut cfg = ft_common::run_config(data, ad.clone(), blackmamba::finetune::Method::Lora, 4);
    cfg.lr = 1e-2;
    let mut t = Trainer::new(&base, &byte_tokenizer(), cfg).unwrap();
    while !t.done() {
        t.step().unwrap();
    }
    t.save().unwrap();

    let spawn = |adapter: Option<PathBuf>| {
        let (tx, rx) = channel();
        let spec = LoadSpec {
            model: Some(dir.path().join("model").display().to_string()),
            tokenizer: Some(tok_path.clone()),
            adapter,
            ..Default::default()
        };
        let e = Engine::spawn(
            Source::Spec(spec),
            Box::new(move |ev| {
                let _ = tx.send(ev);
            }),
        )
        .unwrap();
        let end = until(&rx, |ev| matches!(ev, EngineEvent::Loaded(_) | EngineEvent::Fatal(_)));
        (e, rx, end.into_iter().last().unwrap())
    };
    let (e, rx, ev) = spawn(Some(ad.clone()));
    match ev {
        EngineEvent::Loaded(info) => assert!(info.label.ends_with(&format!("+ adapter {}", ad.display())), "{}", info.label),
        other => panic!("{other:?}"),
    }
    let (via_flag, _) = fresh_chat(&e, &rx, 1);
    e.shutdown();
    // the engine runs the adapter folded into the weights (what `merge` writes)
    let mut with = base.clone();
    blackmamba::finetune::adapter::apply_merged(&mut with, &ad).unwrap();
    let (e, rx) = engine_with(with);
    let (applied, _) = fresh_chat(&e, &rx, 1);
    e.shutdown();
    let (e, rx) = engine_with(base);
    let (plain, _) = fresh_chat(&e, &rx, 1);
    e.shutdown();
    assert_eq!(via_flag, applied);
    assert_ne!(via_flag, plain, "the adapter changes the model");

    let (_e, _rx, ev) = spawn(Some(dir.path().join("no-adapter-here")));
    match ev {
        EngineEvent::Fatal(m) => assert!(m.contains("no-adapter-here") && m.contains("adapter.json"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_dpo_run_reports_its_rewards() {
    let dir = tempfile::tempdir().unwrap();
    let mut prefs = String::new();
    for (q, a, b) in [
        ("Hi", "Hello there.", "The log."),
        ("What sat on the mat?", "The cat sat on the mat.", "A bird."),
        ("Where did the dog sit?", "The dog sat on the log.", "Hello there."),
        ("Who sang?", "A bird sang in the tree.", "The cat sat on the mat."),
    ] {
        prefs.push_str(&serde_json::json!({"prompt": q, "chosen": a, "rejected": b}).to_string());
        prefs.push('\n');
    }
    let data = write(dir.path(), "prefs.jsonl", &prefs);
    let out = dir.path().join("dpo");
    let (e, rx) = engine();
    let mut s = spec(data, out.clone(), 4);
    s.method = FinetuneMethod::Dpo;
    s.seq_len = 96;
    ft(&e, FinetuneCommand::Start(Box::new(s)));
    // the run's last news is its routing comparison
    let evs = until(&rx, |ev| {
        matches!(ev, EngineEvent::Finetune(FinetuneEvent::RoutingShift(_))) || is_error(ev)
    });
    assert!(evs.iter().any(|ev| is_status(ev, FinetuneStatus::Finished)));
    assert!(!is_error(evs.last().unwrap()), "{:?}", evs.last());
    assert!(evs
        .iter()
        .any(|e| matches!(e, EngineEvent::Notice(n) if n.contains("fine-tuning (dpo)") && n.contains("pairs"))));
    assert!(sinkhorn(&evs).is_empty(), "DPO routes greedily: no Sinkhorn reports");
    let p = progress(&evs);
    assert_eq!(p.len(), 4);
    let r: Vec<_> = p.iter().map(|x| x.pref.unwrap()).collect();
    assert_eq!((r[0].reward_chosen, r[0].reward_rejected), (0.0, 0.0), "step 0: adapters off = on");
    assert!((p[0].loss - std::f64::consts::LN_2).abs() < 1e-6);
    assert!(r[3].margin > r[0].margin, "{r:?}");
    assert!(out.join("adapter.safetensors").is_file());
    // the routing comparison of the end: saved, summed up, and sent to the panel
    assert!(out.join("routing_shift.json").is_file());
    assert!(evs
        .iter()
        .any(|e| matches!(e, EngineEvent::Notice(n) if n.starts_with("routing before vs after"))));
    let shift = evs.iter().find_map(|e| match e {
        EngineEvent::Finetune(FinetuneEvent::RoutingShift(r)) => Some(r.clone()),
        _ => None,
    });
    let shift = shift.expect("a routing comparison event");
    assert_eq!(
        shift.layers.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 3],
        "the two MoE half-blocks"
    );
    assert!(shift.tokens > 0 && shift.layers.iter().all(|l| (0.0..=1.0).contains(&l.1)));
}
