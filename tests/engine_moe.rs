#![allow(clippy::unwrap_used)]
//! The engine (the TUI's chat) on a transformer MoE checkpoint: loaded from `--model DIR` by its
//! model_type, turns decoded with the key/value cache and their top-k telemetry, regenerate and
//! undo from the kept caches, and BlackMamba-only commands answered with one line.

mod engine_common;

use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use blackmamba::engine::protocol::{CancelFlag, Command, EngineEvent, LoadSpec, TokenRec};
use blackmamba::engine::{Engine, Source};
use blackmamba::sampling::SamplingParams;

fn spawn(fixture: &str) -> (Engine, Receiver<EngineEvent>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
    let (tx, rx) = channel();
    let spec = LoadSpec {
        model: Some(dir.to_string_lossy().into_owned()),
        device: Some("cpu".into()),
        ..Default::default()
    };
    let e = Engine::spawn(
        Source::Spec(spec),
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    (e, rx)
}

fn until_done(rx: &Receiver<EngineEvent>) -> Vec<EngineEvent> {
    engine_common::until(rx, Duration::from_secs(60), |ev| {
        matches!(ev, EngineEvent::Done { .. } | EngineEvent::Error { .. } | EngineEvent::Fatal(_))
    })
}

fn chat(e: &Engine, rx: &Receiver<EngineEvent>, id: u64, text: &str) -> Vec<EngineEvent> {
    let params = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    };
    assert!(e.send(Command::Chat {
        id,
        text: text.into(),
        params,
        cancel: CancelFlag::default(),
    }));
    until_done(rx)
}

fn tokens(evs: &[EngineEvent]) -> (Vec<TokenRec>, Vec<TokenRec>) {
    let mut prompt = Vec::new();
    let mut gen = Vec::new();
    for ev in evs {
        match ev {
            EngineEvent::Prompt { tokens, .. } => prompt.extend(tokens.iter().cloned()),
            EngineEvent::Token { rec, .. } => gen.push((**rec).clone()),
            _ => {}
        }
    }
    (prompt, gen)
}

#[test]
fn a_transformer_chats_with_its_cache_and_top_k_telemetry() {
    let (e, rx) = spawn("olmoe-tiny");
    let first = engine_common::until(&rx, Duration::from_secs(60), |ev| {
        matches!(ev, EngineEvent::Loaded(_) | EngineEvent::Fatal(_))
    });
    let Some(EngineEvent::Loaded(info)) = first.last() else {
        panic!("not loaded: {first:?}")
    };
    assert_eq!(info.moe_layers, vec![(0, 16), (1, 16)]);
    assert!(info.mamba_layers.is_empty() && !info.finetune_available);
    assert!(info.params_active < info.params_total);

    let evs = chat(&e, &rx, 1, "Which expert?");
    assert!(matches!(evs.last(), Some(EngineEvent::Done { .. })), "{evs:?}");
    let (prompt, gen) = tokens(&evs);
    assert_eq!(gen.len(), 6, "six tokens: {evs:?}");
    let all: Vec<&TokenRec> = prompt.iter().chain(&gen).collect();
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.pos, i, "positions run on through the turn");
    }
    // every fed token carries both layers' four experts (the last one is sampled, not fed)
    for r in &all[..all.len() - 1] {
        assert_eq!(r.routes.len(), 2);
        assert!(r.more.iter().all(|m| m.len() == 3), "{:?}", r.more);
    }

    // regenerate from the kept cache: greedy gives the same answer
    assert!(e.send(Command::Regenerate {
        id: 2,
        params: SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        },
        cancel: CancelFlag::default(),
    }));
    let again = until_done(&rx);
    let ids = |v: &[TokenRec]| v.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(&tokens(&again).1), ids(&gen));
    assert!(again.iter().any(|ev| matches!(ev, EngineEvent::Rewound { turns: 0, .. })));

    // a second turn continues the cache
    let evs2 = chat(&e, &rx, 3, "And the next?");
    let (p2, _) = tokens(&evs2);
    assert_eq!(
        p2[0].pos,
        all.len() - 1,
        "the second turn starts with the first answer's unfed token"
    );

    // undo twice: back to the empty conversation
    assert!(e.send(Command::Undo));
    let ev = engine_common::until(&rx, Duration::from_secs(10), |ev| matches!(ev, EngineEvent::Rewound { .. }));
    assert!(matches!(ev.last(), Some(EngineEvent::Rewound { turns: 1, .. })));
    assert!(e.send(Command::Undo));
    let ev = engine_common::until(&rx, Duration::from_secs(10), |ev| matches!(ev, EngineEvent::Rewound { .. }));
    assert!(matches!(ev.last(), Some(EngineEvent::Rewound { pos: 0, turns: 0 })));

    // Sinkhorn runs over the transformer's router history (its log-probabilities)
    let evs4 = chat(&e, &rx, 5, "Route me");
    assert!(matches!(evs4.last(), Some(EngineEvent::Done { .. })));
    assert!(e.send(Command::Sinkhorn {
        window: 64,
        max_iters: 50,
        tol: 1e-3
    }));
    let ev = engine_common::until(&rx, Duration::from_secs(10), |ev| {
        matches!(ev, EngineEvent::Sinkhorn(_) | EngineEvent::Error { .. })
    });
    let Some(EngineEvent::Sinkhorn(r)) = ev.last() else {
        panic!("{ev:?}")
    };
    assert_eq!(r.layers.len(), 2);
    let (p4, g4) = tokens(&evs4);
    assert_eq!(r.n_tokens, p4.len() + g4.len() - 1, "every fed token of the conversation");
    for l in &r.layers {
        assert_eq!((l.n_experts, l.greedy_loads.iter().sum::<usize>()), (16, r.n_tokens));
    }

    // BlackMamba-only commands: one line each, and the engine keeps running
    let path = std::env::temp_dir().join("blackmamba-engine-moe-chat.json");
    assert!(e.send(Command::SaveChat(path.clone())));
    let ev = engine_common::until(&rx, Duration::from_secs(10), |ev| matches!(ev, EngineEvent::Error { .. }));
    let Some(EngineEvent::Error { message, .. }) = ev.last() else {
        unreachable!()
    };
    assert!(message.contains("BlackMamba") && message.contains("olmoe"), "{message}");
    assert!(!path.exists());
    let evs3 = chat(&e, &rx, 4, "Still there?");
    assert!(tokens(&evs3).0[0].pos > 0, "the conversation goes on");
    assert!(matches!(evs3.last(), Some(EngineEvent::Done { .. })));
    e.shutdown();
}
