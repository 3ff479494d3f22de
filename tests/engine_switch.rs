#![allow(clippy::unwrap_used)]
//! Switching models in the running engine (the TUI's model picker): `Load` reports progress and
//! answers `Loaded` with a fresh conversation on the new model; a model that cannot load answers
//! `LoadFailed` and the old one keeps serving; a fine-tuning run blocks the switch; `ListModels`
//! answers the catalogue of the process's hub cache.

mod common;
mod engine_common;

#[cfg(feature = "cuda")]
mod gpu_common;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use blackmamba::catalog::Availability;
use blackmamba::engine::protocol::{CancelFlag, Command, EngineEvent, FinetuneCommand, FinetuneMethod, FinetuneSpec, LoadSpec};
use blackmamba::engine::Engine;
use blackmamba::sampling::SamplingParams;
use candle_core::DType;

const WAIT: Duration = Duration::from_secs(120);

fn engine() -> (Engine, Receiver<EngineEvent>) {
    let cfg = common::tiny_config(&["r", "8", "r", "4"], 16, 50304);
    let tok = blackmamba::tokenizer::neox().unwrap();
    let (e, rx, first) = engine_common::spawn(common::tiny_model(&cfg, 3), tok, WAIT);
    assert!(matches!(first, EngineEvent::Loaded(_)));
    (e, rx)
}

/// Events up to and including the first one `stop` accepts.
fn until(rx: &Receiver<EngineEvent>, stop: impl Fn(&EngineEvent) -> bool) -> Vec<EngineEvent> {
    engine_common::until(rx, WAIT, stop)
}

fn spec(model: &str) -> LoadSpec {
    LoadSpec {
        model: Some(model.into()),
        device: Some("cpu".into()),
        dtype: Some("f32".into()),
        ..Default::default()
    }
}

fn load_ended(ev: &EngineEvent) -> bool {
    matches!(
        ev,
        EngineEvent::Loaded(_) | EngineEvent::LoadFailed(_) | EngineEvent::Error { .. } | EngineEvent::Fatal(_)
    )
}

/// One greedy chat turn; returns the positions of its prompt tokens.
fn chat(e: &Engine, rx: &Receiver<EngineEvent>, id: u64) -> Vec<usize> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 3,
        ..Default::default()
    };
    assert!(e.send(Command::Chat {
        id,
        text: "hello".into(),
        params,
        cancel: CancelFlag::new(),
    }));
    let evs = until(rx, |ev| matches!(ev, EngineEvent::Done { .. } | EngineEvent::Error { .. }));
    assert!(matches!(evs.last(), Some(EngineEvent::Done { .. })), "{:?}", evs.last());
    evs.iter()
        .filter_map(|ev| match ev {
            EngineEvent::Prompt { tokens, .. } => Some(tokens.iter().map(|t| t.pos).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn load_switches_to_a_new_model_and_a_new_chat() {
    let (e, rx) = engine();
    let first = chat(&e, &rx, 1);
    assert_eq!(first[0], 0);
    let second = chat(&e, &rx, 2);
    assert!(second[0] > 0, "the second turn continues the conversation");

    // a folder
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config(&["r", "4"], 24, 50304);
    common::tiny_model(&cfg, 9).save_dir(dir.path(), DType::F32).unwrap();
    assert!(e.send(Command::Load(spec(dir.path().to_str().unwrap()))));
    let evs = until(&rx, load_ended);
    assert!(
        evs.iter().any(|ev| matches!(ev, EngineEvent::LoadProgress { .. })),
        "progress is reported: {evs:?}"
    );
    let Some(EngineEvent::Loaded(info)) = evs.last() else {
        panic!("expected Loaded, got {:?}", evs.last())
    };
    assert_eq!(info.label, dir.path().display().to_string());
    assert!(!info.untrained);
    assert_eq!(info.d_model, 24);
    assert_eq!(info.moe_layers, vec![(1, 4)]);
    // the conversation starts over on the new model
    assert_eq!(chat(&e, &rx, 3)[0], 0);

    // random weights of a named shape, in bf16
    let mut s = spec("random:tiny@4");
    s.dtype = Some("bf16".into());
    assert!(e.send(Command::Load(s)));
    let Some(EngineEvent::Loaded(info)) = until(&rx, load_ended).pop() else {
        panic!("expected Loaded")
    };
    assert_eq!(info.label, "random:tiny@4");
    assert!(info.untrained, "random weights show the demo banner");
    assert_eq!(info.dtype, "bf16");
    assert_eq!(chat(&e, &rx, 4)[0], 0);
    e.shutdown();
}

#[test]
fn a_failed_load_keeps_the_old_model() {
    let (e, rx) = engine();
    chat(&e, &rx, 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    for (model, what) in [
        (dir.path().to_str().unwrap().to_string(), "config.json"),
        ("random:huge".to_string(), "unknown random shape 'huge'"),
        ("no/such/thing".to_string(), "no such folder"),
    ] {
        assert!(e.send(Command::Load(spec(&model))));
        match until(&rx, load_ended).pop().unwrap() {
            EngineEvent::LoadFailed(m) => {
                assert!(m.contains(what), "{m}");
                assert!(m.ends_with("still on tiny"), "{m}");
            }
            other => panic!("expected LoadFailed for {model}, got {other:?}"),
        }
    }
    let mut bad_dtype = spec("random:tiny");
    bad_dtype.dtype = Some("f8".into());
    assert!(e.send(Command::Load(bad_dtype)));
    assert!(matches!(until(&rx, load_ended).pop().unwrap(), EngineEvent::LoadFailed(m) if m.contains("--dtype f8")));
    // the old model still answers, in the same conversation
    assert!(chat(&e, &rx, 2)[0] > 0);
    e.shutdown();
}

#[test]
fn a_running_fine_tune_blocks_the_switch() {
    let (e, rx) = engine();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("text.txt");
    std::fs::write(&data, "The cat sat on the mat. The dog sat on the log. ".repeat(20)).unwrap();
    let ft = FinetuneSpec {
        data,
        method: FinetuneMethod::Router,
        targets: vec![],
        rank: 4,
        alpha: 8.0,
        lr: 1e-3,
        steps: 100_000,
        seq_len: 16,
        batch: 2,
        out: dir.path().join("run"),
    };
    assert!(e.send(Command::Finetune(FinetuneCommand::Start(Box::new(ft)))));
    until(&rx, |ev| {
        assert!(!matches!(ev, EngineEvent::Error { .. }), "{ev:?}");
        matches!(ev, EngineEvent::Finetune(blackmamba::engine::protocol::FinetuneEvent::Progress(_)))
    });
    assert!(e.send(Command::Load(spec("random:tiny"))));
    let m = until(&rx, |ev| matches!(ev, EngineEvent::LoadFailed(_) | EngineEvent::Loaded(_)))
        .into_iter()
        .find_map(|ev| match ev {
            EngineEvent::LoadFailed(m) => Some(m),
            _ => None,
        })
        .expect("the switch is refused");
    assert!(
        m.contains("fine-tuning run is going") && m.contains("x in the Fine-tune view"),
        "{m}"
    );
    assert!(e.send(Command::Finetune(FinetuneCommand::Stop)));
    until(&rx, |ev| matches!(ev, EngineEvent::Notice(n) if n.contains("fine-tuning stopped")));
    // stopped: now it switches
    assert!(e.send(Command::Load(spec("random:tiny"))));
    assert!(matches!(until(&rx, load_ended).pop().unwrap(), EngineEvent::Loaded(_)));
    e.shutdown();
}

#[test]
fn list_models_reads_the_hub_cache_of_the_edges_settings() {
    let cache = tempfile::tempdir().unwrap();
    let hub = blackmamba::hub::HubEnv {
        cache_dir: cache.path().to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
        convert_cache: None,
    };
    let cfg = common::tiny_config(&["r", "8", "r", "4"], 16, 50304);
    let opts = blackmamba::engine::protocol::EngineOpts {
        hub: Some(hub),
        ..Default::default()
    };
    let (e, rx, first) = engine_common::spawn_with(common::tiny_model(&cfg, 3), blackmamba::tokenizer::neox().unwrap(), WAIT, opts);
    assert!(matches!(first, EngineEvent::Loaded(_)));
    assert!(e.send(Command::ListModels));
    let evs = until(&rx, |ev| matches!(ev, EngineEvent::Models(_)));
    let Some(EngineEvent::Models(c)) = evs.last() else { unreachable!() };
    assert_eq!(c.cache_dir, cache.path());
    assert!(c.offline);
    assert_eq!(c.choices[0].name, "embedded");
    let z = c.choices.iter().find(|m| m.name == "Zyphra/BlackMamba-2.8B").unwrap();
    assert!(matches!(z.availability, Availability::Unavailable { .. }));
    e.shutdown();
    // without hub settings: the embedded model and the random shapes, no hub entry
    let (e, rx) = engine();
    assert!(e.send(Command::ListModels));
    let evs = until(&rx, |ev| matches!(ev, EngineEvent::Models(_)));
    let Some(EngineEvent::Models(c)) = evs.last() else { unreachable!() };
    assert!(c.choices.iter().all(|m| !m.name.starts_with("Zyphra/")), "{:?}", c.choices);
    assert!(c.choices.iter().any(|m| m.name == "random:tiny"));
    e.shutdown();
}

/// On a GPU: the embedded model on CUDA (bf16), switched to random weights on CUDA (f32), to the
/// CPU and back to the embedded model on CUDA (twice); every model answers in a new chat.
#[cfg(feature = "cuda")]
#[test]
fn switches_between_gpu_and_cpu() {
    use blackmamba::engine::Source;
    if gpu_common::device().is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let start = LoadSpec {
        device: Some("cuda".into()),
        dtype: Some("bf16".into()),
        ..Default::default()
    };
    let e = Engine::spawn(
        Source::Spec(start.clone()),
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    let Some(EngineEvent::Loaded(info)) = until(&rx, load_ended).pop() else {
        panic!("the embedded model loads on the GPU")
    };
    assert!(info.is_gpu && info.dtype == "bf16", "{info:?}");
    assert_eq!(chat(&e, &rx, 1)[0], 0);
    let mut gpu_f32 = spec("random:tiny");
    gpu_f32.device = Some("cuda".into());
    for (id, s) in (2..).zip([gpu_f32, spec("random:tiny@1"), start.clone(), start]) {
        let want_gpu = s.device.as_deref() == Some("cuda");
        assert!(e.send(Command::Load(s.clone())));
        let Some(EngineEvent::Loaded(info)) = until(&rx, load_ended).pop() else {
            panic!("{s:?} loads")
        };
        assert_eq!(info.is_gpu, want_gpu, "{info:?}");
        assert_eq!(Some(info.dtype.as_str()), s.dtype.as_deref());
        assert_eq!(chat(&e, &rx, id)[0], 0);
    }
    e.shutdown();
}
