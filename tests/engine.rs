#![allow(clippy::unwrap_used)]
//! The engine thread on CPU with a tiny random model: event order, cancel, regenerate / undo from
//! state snapshots, saved conversations, Sinkhorn windows, errors that leave it running.

mod common;
mod engine_common;

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use blackmamba::engine::protocol::{CancelFlag, Command, EngineEvent, FinetuneCommand};
use blackmamba::engine::{Engine, Source};
use blackmamba::generate::StopReason;
use blackmamba::sampling::SamplingParams;

fn engine() -> (Engine, Receiver<EngineEvent>) {
    let cfg = common::tiny_config(&["r", "8", "r", "4"], 16, 50304);
    let tok = blackmamba::tokenizer::neox().unwrap();
    let (e, rx, first) = engine_common::spawn(common::tiny_model(&cfg, 3), tok, Duration::from_secs(60));
    match first {
        EngineEvent::Loaded(info) => {
            assert!(info.untrained);
            assert_eq!(info.moe_layers, vec![(1, 8), (3, 4)]);
            assert_eq!(info.mamba_layers, vec![0, 2]);
            assert_eq!(
                info.bytes_per_token,
                4.0 * cfg.param_counts().1 as f64,
                "f32: 4 bytes per active parameter"
            );
        }
        other => panic!("expected Loaded, got {other:?}"),
    }
    (e, rx)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        max_tokens,
        ..Default::default()
    }
}

/// Events up to and including the next Done or Error.
fn until_done(rx: &Receiver<EngineEvent>) -> Vec<EngineEvent> {
    engine_common::until(rx, Duration::from_secs(60), |ev| {
        matches!(ev, EngineEvent::Done { .. } | EngineEvent::Error { .. })
    })
}

/// Generated token ids and the stop reason of a finished request.
fn answer(evs: &[EngineEvent]) -> (Vec<u32>, StopReason) {
    let ids = evs
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Token { rec, .. } => Some(rec.id),
            _ => None,
        })
        .collect();
    let stop = evs
        .iter()
        .find_map(|e| match e {
            EngineEvent::Done { stop, .. } => Some(*stop),
            _ => None,
        })
        .expect("Done");
    (ids, stop)
}

fn chat(e: &Engine, rx: &Receiver<EngineEvent>, id: u64, text: &str, p: &SamplingParams) -> Vec<EngineEvent> {
    e.send(Command::Chat {
        id,
        text: text.into(),
        params: p.clone(),
        cancel: CancelFlag::new(),
    });
    until_done(rx)
}

#[test]
fn chat_events_come_in_order_with_consecutive_positions() {
    let (e, rx) = engine();
    let evs = chat(&e, &rx, 1, "Hello there", &greedy(6));
    assert!(matches!(&evs[0], EngineEvent::TurnStarted { id: 1, user } if user == "Hello there"));
    let mut pos = 0;
    let mut prompt_tokens = 0;
    let mut seen_token = false;
    for ev in &evs[1..evs.len() - 1] {
        match ev {
            EngineEvent::Prompt { id: 1, tokens } => {
                assert!(!seen_token, "prompt telemetry comes before tokens");
                for t in tokens {
                    assert_eq!(t.pos, pos);
                    assert_eq!(t.routes.len(), 2);
                    assert_eq!(t.ssm_norm.len(), 2);
                    pos += 1;
                    prompt_tokens += 1;
                }
            }
            EngineEvent::Token { id: 1, rec, .. } => {
                seen_token = true;
                assert_eq!(rec.pos, pos);
                assert!(rec.generated);
                pos += 1;
            }
            EngineEvent::Tail { id: 1, .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (ids, stop) = answer(&evs);
    assert!(!ids.is_empty() && ids.len() <= 6);
    assert!(matches!(stop, StopReason::MaxTokens | StopReason::Eos | StopReason::StopString));
    if let EngineEvent::Done { stats, .. } = evs.last().unwrap() {
        assert_eq!(stats.prompt_tokens, prompt_tokens, "the whole prompt counts");
        assert!(prompt_tokens > 3 && stats.gen_tokens == ids.len());
        assert!(stats.ttft_secs >= stats.prefill_secs);
    }
    e.shutdown();
}

#[test]
fn regenerate_and_undo_restore_the_state() {
    let (e, rx) = engine();
    let p = greedy(8);
    let (first, _) = answer(&chat(&e, &rx, 1, "Tell me about Mamba", &p));
    let (second, _) = answer(&chat(&e, &rx, 2, "And experts?", &p));
    // greedy: the regenerated answer must equal the original one exactly
    e.send(Command::Regenerate {
        id: 3,
        params: p.clone(),
        cancel: CancelFlag::new(),
    });
    let evs = until_done(&rx);
    assert!(matches!(evs[0], EngineEvent::Rewound { turns: 1, .. }));
    assert_eq!(answer(&evs).0, second);
    // undo the second turn, ask again: same answer again
    e.send(Command::Undo);
    let ev = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(matches!(ev, EngineEvent::Rewound { turns: 1, .. }), "{ev:?}");
    assert_eq!(answer(&chat(&e, &rx, 4, "And experts?", &p)).0, second);
    // undo both and start over: the first answer comes back
    e.send(Command::Undo);
    e.send(Command::Undo);
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    assert_eq!(answer(&chat(&e, &rx, 5, "Tell me about Mamba", &p)).0, first);
    e.send(Command::NewChat { system: None });
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        EngineEvent::Rewound { pos: 0, turns: 0 }
    ));
    assert_eq!(answer(&chat(&e, &rx, 6, "Tell me about Mamba", &p)).0, first);
    e.shutdown();
}

#[test]
fn saved_conversation_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.json");
    let p = greedy(5);
    let (a, rx_a) = engine();
    chat(&a, &rx_a, 1, "one", &p);
    chat(&a, &rx_a, 2, "two", &p);
    a.send(Command::SaveChat(path.clone()));
    assert!(matches!(
        rx_a.recv_timeout(Duration::from_secs(30)).unwrap(),
        EngineEvent::Notice(_)
    ));
    let (expected, _) = answer(&chat(&a, &rx_a, 3, "three", &p));

    let (b, rx_b) = engine();
    b.send(Command::LoadChat(path.clone()));
    match rx_b.recv_timeout(Duration::from_secs(30)).unwrap() {
        EngineEvent::Conversation(info) => {
            assert_eq!(info.turns.len(), 2);
            assert_eq!(info.turns[0].0, "one");
        }
        other => panic!("{other:?}"),
    }
    rx_b.recv_timeout(Duration::from_secs(30)).unwrap(); // notice
    assert_eq!(answer(&chat(&b, &rx_b, 1, "three", &p)).0, expected);
    // regenerate after loading reuses the saved snapshot
    b.send(Command::Undo);
    rx_b.recv_timeout(Duration::from_secs(30)).unwrap();
    b.send(Command::Regenerate {
        id: 2,
        params: p.clone(),
        cancel: CancelFlag::new(),
    });
    let evs = until_done(&rx_b);
    assert!(matches!(evs.last(), Some(EngineEvent::Done { .. })));

    // a broken file is an error and the engine keeps going
    std::fs::write(&path, "{not json").unwrap();
    b.send(Command::LoadChat(path.clone()));
    match rx_b.recv_timeout(Duration::from_secs(30)).unwrap() {
        EngineEvent::Error { message, .. } => assert!(message.contains("chat.json"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        chat(&b, &rx_b, 9, "still there?", &p).last(),
        Some(EngineEvent::Done { id: 9, .. })
    ));
    a.shutdown();
    b.shutdown();
}

#[test]
fn cancel_stops_within_a_token() {
    let (e, rx) = engine();
    let cancel = CancelFlag::new();
    e.send(Command::Chat {
        id: 1,
        text: "go on and on".into(),
        params: SamplingParams {
            max_tokens: 100_000,
            stop: vec![],
            ..greedy(100_000)
        },
        cancel: cancel.clone(),
    });
    let mut tokens = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            EngineEvent::Token { .. } => {
                tokens += 1;
                if tokens == 3 {
                    cancel.cancel();
                }
            }
            EngineEvent::Done { stop, stats, .. } => {
                assert_eq!(stop, StopReason::Cancelled);
                assert!(tokens >= 3 && stats.gen_tokens <= 4, "{tokens} {}", stats.gen_tokens);
                break;
            }
            EngineEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    e.shutdown();
}

#[test]
fn a_long_prompt_can_be_cancelled_while_it_is_read() {
    use blackmamba::engine::chat::PREFILL_CHUNK;
    let cfg = common::tiny_config(&["r", "8", "r", "4"], 16, 50304);
    let tok = blackmamba::tokenizer::neox().unwrap();
    let loaded = blackmamba::loader::Loaded {
        model: common::tiny_model(&cfg, 3),
        tokenizer: tok,
        label: "tiny".into(),
        untrained: true,
        load_secs: 0.0,
        notes: Vec::new(),
    };
    // the sink runs on the engine thread: the flag is set as soon as the first chunk is reported,
    // as Esc would be while the rest of the paste is read
    let cancel = CancelFlag::new();
    let (tx, rx) = channel();
    let flag = cancel.clone();
    let e = Engine::spawn(
        Source::Loaded(Box::new(loaded)),
        Box::new(move |ev| {
            if matches!(ev, EngineEvent::Prompt { id: 1, .. }) {
                flag.cancel();
            }
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    assert!(matches!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), EngineEvent::Loaded(_)));
    let paste = "word ".repeat(3 * PREFILL_CHUNK);
    e.send(Command::Chat {
        id: 1,
        text: paste,
        params: greedy(8),
        cancel,
    });
    let evs = until_done(&rx);
    let read: usize = evs
        .iter()
        .map(|ev| match ev {
            EngineEvent::Prompt { tokens, .. } => tokens.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(read, PREFILL_CHUNK, "one chunk read, then the cancel was seen");
    assert!(!evs.iter().any(|ev| matches!(ev, EngineEvent::Token { .. })), "nothing generated");
    let n = evs.len();
    assert!(
        matches!(evs[n - 2], EngineEvent::Rewound { pos: 0, turns: 0 }),
        "the turn is dropped: {:?}",
        evs[n - 2]
    );
    assert!(matches!(
        evs[n - 1],
        EngineEvent::Done {
            stop: StopReason::Cancelled,
            ..
        }
    ));
    // the conversation is as before: the next turn starts at position 0
    let evs = chat(&e, &rx, 2, "Hello", &greedy(4));
    let first = evs.iter().find_map(|ev| match ev {
        EngineEvent::Prompt { tokens, .. } => tokens.first().map(|t| t.pos),
        _ => None,
    });
    assert_eq!(first, Some(0));
    let (_, stop) = answer(&evs);
    assert_ne!(stop, StopReason::Cancelled);
    e.shutdown();
}

#[test]
fn sinkhorn_runs_over_the_last_window() {
    let (e, rx) = engine();
    chat(&e, &rx, 1, "Some words to route through the experts", &greedy(10));
    e.send(Command::Sinkhorn {
        window: 8,
        max_iters: 50,
        tol: 1e-4,
    });
    match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
        EngineEvent::Sinkhorn(r) => {
            assert_eq!(r.n_tokens, 8);
            assert_eq!(r.layers.len(), 2);
            assert_eq!(r.layers[1].n_experts, 4);
            for l in &r.layers {
                assert_eq!(l.greedy_loads.iter().sum::<usize>(), 8);
                assert_eq!(l.runs.len(), 2);
                for run in &l.runs {
                    assert_eq!(run.loads.iter().sum::<usize>(), 8);
                    assert!(run.iters() >= 1 && run.iters() <= 50);
                    assert!(run.changed <= 8);
                }
            }
        }
        other => panic!("{other:?}"),
    }
    e.send(Command::Sinkhorn {
        window: 0,
        max_iters: 50,
        tol: 1e-4,
    });
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        EngineEvent::Error { .. }
    ));
    e.shutdown();
}

#[test]
fn finetune_commands_without_a_run_say_so_plainly() {
    let (e, rx) = engine();
    e.send(Command::Finetune(FinetuneCommand::Pause));
    match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
        EngineEvent::Error { id: None, message } => assert!(message.starts_with("nothing to pause: no fine-tuning run yet"), "{message}"),
        other => panic!("{other:?}"),
    }
    // bad sampling parameters are an error of that request, and the engine keeps serving
    let evs = chat(&e, &rx, 7, "hi", &SamplingParams { top_p: 0.0, ..greedy(3) });
    assert!(matches!(evs.last(), Some(EngineEvent::Error { id: Some(7), message }) if message.contains("top-p")));
    assert!(evs.iter().any(|e| matches!(e, EngineEvent::Rewound { turns: 0, .. })));
    let evs = chat(&e, &rx, 8, "hi", &greedy(3));
    assert!(matches!(evs.last(), Some(EngineEvent::Done { id: 8, .. })));
    e.shutdown();
}

#[test]
fn a_model_that_cannot_load_is_reported_not_panicked() {
    let (tx, rx) = channel();
    let spec = blackmamba::engine::protocol::LoadSpec {
        model: Some("./no/such/model-folder".into()),
        ..Default::default()
    };
    let e = Engine::spawn(
        Source::Spec(spec),
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    let fatal = loop {
        match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            EngineEvent::LoadProgress { .. } => {}
            EngineEvent::Fatal(m) => break m,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        fatal.contains("no/such/model-folder") && fatal.contains("loading the model failed"),
        "{fatal}"
    );
    e.shutdown();
}
