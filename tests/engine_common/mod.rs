//! Shared helpers of the engine tests: an engine on an already loaded model, and reading its
//! events up to one a test waits for.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use blackmamba::engine::protocol::{EngineEvent, EngineOpts};
use blackmamba::engine::{Engine, Source};
use blackmamba::loader::Loaded;
use blackmamba::model::Model;
use tokenizers::Tokenizer;

/// An engine thread on `model` (label "tiny", marked untrained) with its event receiver and the
/// first event it sent (the load's outcome, for the caller to check).
pub fn spawn(model: Model, tokenizer: Tokenizer, wait: Duration) -> (Engine, Receiver<EngineEvent>, EngineEvent) {
    spawn_with(model, tokenizer, wait, EngineOpts::default())
}

/// [`spawn`] with the engine's options (the hub settings, the kernel switches).
pub fn spawn_with(model: Model, tokenizer: Tokenizer, wait: Duration, opts: EngineOpts) -> (Engine, Receiver<EngineEvent>, EngineEvent) {
    let loaded = Loaded {
        model,
        tokenizer,
        label: "tiny".into(),
        untrained: true,
        load_secs: 0.0,
        notes: Vec::new(),
    };
    let (tx, rx) = channel();
    let e = Engine::spawn_with(
        Source::Loaded(Box::new(loaded)),
        opts,
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    let first = rx.recv_timeout(wait).unwrap();
    (e, rx, first)
}

/// Events up to and including the first one `stop` accepts, each within `wait`.
pub fn until(rx: &Receiver<EngineEvent>, wait: Duration, stop: impl Fn(&EngineEvent) -> bool) -> Vec<EngineEvent> {
    let mut out = vec![];
    loop {
        let ev = rx.recv_timeout(wait).expect("the engine answered");
        let end = stop(&ev);
        out.push(ev);
        if end {
            return out;
        }
    }
}
