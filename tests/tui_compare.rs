#![allow(clippy::unwrap_used)]
//! The compare view (F6) end to end: the engine runs one text through the chat's model and model
//! B (the same model in another weight format, or the OLMoE tiny fixture), its report carries the
//! routing flips that the test counts again from the models' own probes, and the view draws it
//! (snapshots at a normal and a tiny size); the picker's weight format reaches the load it sends
//! and the status bar.

mod engine_common;

use std::sync::mpsc::Receiver;
use std::time::Duration;

use blackmamba::engine::compare::CompareReport;
use blackmamba::engine::protocol::{Command, CompareWith, EngineEvent, LoadSpec};
use blackmamba::engine::{Engine, Source};
use blackmamba::loader::Loaded;
use blackmamba::model::probe::Probe;
use blackmamba::model::{Logits, Model};
use blackmamba::quant::{QuantFormat, QuantSpec};
use blackmamba::tui::app::{App, Msg, View};
use blackmamba::tui::theme::Theme;
use blackmamba::tui::ui;
use candle_core::{DType, Device, Tensor};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const TEXT: &str = "The lighthouse keeper climbed the stairs at dusk, counting the steps as he always did, \
and wound the clockwork that turned the lamp. Far out, a freighter answered with two short blasts.";

const WAIT: Duration = Duration::from_secs(120);

fn spawn() -> (Engine, Receiver<EngineEvent>, EngineEvent) {
    let (model, tokenizer) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let loaded = Loaded {
        model,
        tokenizer,
        label: "embedded".into(),
        untrained: false,
        load_secs: 0.0,
        notes: Vec::new(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let e = Engine::spawn(
        Source::Loaded(Box::new(loaded)),
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    let first = rx.recv_timeout(WAIT).unwrap();
    (e, rx, first)
}

/// Sends `cmd` and returns the comparison it answers with (panics on an error).
fn compare(e: &Engine, rx: &Receiver<EngineEvent>, cmd: Command) -> Box<CompareReport> {
    assert!(e.send(cmd));
    let evs = engine_common::until(rx, WAIT, |ev| {
        matches!(ev, EngineEvent::Compare(_) | EngineEvent::Error { .. } | EngineEvent::Fatal(_))
    });
    match evs.into_iter().last() {
        Some(EngineEvent::Compare(r)) => r,
        other => panic!("no comparison: {other:?}"),
    }
}

fn format(f: QuantFormat) -> CompareWith {
    CompareWith::Format(Some(QuantSpec::new(f, &[], &[], true).unwrap()))
}

fn olmoe() -> LoadSpec {
    // relative to the package root (cargo runs tests there), so the snapshots, which show the
    // model's label, do not depend on where the checkout lives
    LoadSpec {
        model: Some("./tests/fixtures/olmoe-tiny".into()),
        device: Some("cpu".into()),
        dtype: Some("f32".into()),
        ..Default::default()
    }
}

/// The first expert of every token in every MoE layer, from the model's own probe.
fn first_experts(m: &Model, ids: &[u32]) -> Vec<Vec<u32>> {
    let mut state = m.new_state(1).unwrap();
    let mut probe = Probe::new();
    let t = Tensor::from_slice(ids, (1, ids.len()), &m.device).unwrap();
    m.forward(&t, &mut state, Logits::Last, Some(&mut probe)).unwrap();
    probe.moe.iter().map(|r| r.experts.clone()).collect()
}

#[test]
fn the_compare_event_carries_the_flips_the_models_own_probes_give() {
    let (e, rx, first) = spawn();
    assert!(matches!(first, EngineEvent::Loaded(_)), "{first:?}");
    let r = compare(
        &e,
        &rx,
        Command::Compare {
            text: TEXT.into(),
            with: format(QuantFormat::Q4 { group: 64 }),
        },
    );
    // the same flips, counted here from a q4 copy of the model and both probes
    let (m, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let mut q = m.clone();
    let spec = QuantSpec::new(QuantFormat::Q4 { group: 64 }, &[], &[], true).unwrap();
    blackmamba::quant::apply::quantize_model(&mut q, &spec).unwrap();
    let ids = tok.encode(TEXT, false).unwrap().get_ids().to_vec();
    let (ea, eb) = (first_experts(&m, &ids), first_experts(&q, &ids));
    assert!(r.same_model && r.same_tokens);
    assert_eq!((r.a.format.as_str(), r.b.format.as_str()), ("f32", "q4g64"));
    assert_eq!(r.a.pieces.len(), ids.len());
    assert_eq!(r.layers.len(), ea.len());
    let mut total = 0;
    for (l, f) in r.layers.iter().enumerate() {
        let flips = ea[l].iter().zip(&eb[l]).filter(|(x, y)| x != y).count();
        assert_eq!((f.slot_a, f.slot_b, f.pairs), (l, l, ids.len()));
        assert_eq!(f.flips, flips, "layer {l}");
        assert!((f.flip_share() - flips as f64 / ids.len() as f64).abs() < 1e-12);
        assert_eq!(f.jaccard, None, "top-1 on both sides");
        total += flips;
    }
    assert!(total > 0, "q4 moves some routes of the embedded model on this text");
    // a dense model has no dense twin to compare with: one line saying what to pick
    assert!(e.send(Command::Compare {
        text: TEXT.into(),
        with: CompareWith::Format(None),
    }));
    let evs = engine_common::until(&rx, WAIT, |ev| matches!(ev, EngineEvent::Error { .. } | EngineEvent::Compare(_)));
    let Some(EngineEvent::Error { message, .. }) = evs.last() else {
        panic!("{evs:?}")
    };
    assert!(message.contains("already dense") && !message.contains('\n'), "{message}");
    e.shutdown();
}

#[test]
fn a_transformer_b_aligns_by_spans_with_top_k_overlap() {
    let (e, rx, _) = spawn();
    let r = compare(
        &e,
        &rx,
        Command::Compare {
            text: TEXT.into(),
            with: CompareWith::Model(olmoe()),
        },
    );
    assert!(!r.same_model && !r.same_tokens, "different tokenizers");
    assert_eq!((r.b.family.as_str(), r.b.k.clone()), ("olmoe", vec![4, 4]));
    assert_eq!(r.layers.len(), r.a.layers.len());
    // every token of both sides is in some pair, in text order
    let mut a_seen = vec![false; r.a.pieces.len()];
    let mut b_seen = vec![false; r.b.pieces.len()];
    for &(i, j) in &r.pairs {
        a_seen[i] = true;
        b_seen[j] = true;
    }
    assert!(a_seen.iter().all(|&s| s) && b_seen.iter().all(|&s| s));
    assert!(r.pairs.windows(2).all(|w| w[0] <= w[1]));
    // the pieces are the text
    assert_eq!(r.b.pieces.concat(), TEXT);
    for f in &r.layers {
        let j = f.jaccard.unwrap();
        assert!((0.0..=1.0).contains(&j) && f.flips <= f.pairs && f.pairs == r.pairs.len());
        // one of A's experts against B's four: the overlap is at most 1/4
        assert!(j <= 0.25 + 1e-12, "{j}");
    }
    e.shutdown();
}

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| ui::draw(app, f.area(), f.buffer_mut())).unwrap();
    format!("{}", term.backend())
}

fn key(app: &mut App, code: KeyCode, m: KeyModifiers) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(code, m)))
}

/// The App on the embedded model's engine, in the compare view, after the comparison `with`
/// (the commands the App sent are checked to be the one comparison).
fn compared(keys: &[char], with_olmoe: bool) -> App {
    let (e, rx, first) = spawn();
    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(first));
    key(&mut app, KeyCode::F(6), KeyModifiers::NONE);
    assert_eq!(app.view, View::Compare);
    let mut cmds = Vec::new();
    for &c in keys {
        cmds.extend(key(&mut app, KeyCode::Char(c), KeyModifiers::NONE));
    }
    if with_olmoe {
        cmds.push(Command::Compare {
            text: String::new(),
            with: CompareWith::Model(olmoe()),
        });
    }
    let [cmd @ Command::Compare { .. }] = &cmds[..] else {
        panic!("one comparison: {cmds:?}")
    };
    let r = compare(&e, &rx, cmd.clone());
    app.update(Msg::Engine(EngineEvent::Compare(r)));
    app.notice = None;
    e.shutdown();
    app
}

#[test]
fn compare_view_same_model_int8_against_dense() {
    // `f` on a dense model: B = the same model in int8
    let mut app = compared(&['f'], false);
    let r = app.cmp.report.as_deref().unwrap();
    assert_eq!((r.a.format.as_str(), r.b.format.as_str()), ("f32", "int8"));
    assert!(app.cmp.pending.is_none());
    // select the first token int8 sends elsewhere in some layer: its B cell is marked
    let flipped = (0..r.a.pieces.len())
        .find(|&t| (0..r.a.layers.len()).any(|m| r.a.experts_of(m, t) != r.b.experts_of(m, t)))
        .expect("int8 moves a route of this text");
    for _ in 0..flipped {
        key(&mut app, KeyCode::Down, KeyModifiers::NONE);
    }
    assert_eq!(app.cmp.sel, flipped);
    let s = screen(&app, 100, 30);
    assert!(s.contains('*') && s.contains("Routing flips, int8 against f32"), "{s}");
    insta::assert_snapshot!("compare_int8_100x30", s);
    insta::assert_snapshot!("compare_int8_19x5", screen(&app, 19, 5));
}

#[test]
fn compare_view_blackmamba_against_olmoe() {
    let app = compared(&[], true);
    let s = screen(&app, 100, 30);
    assert!(s.contains("by character spans") && s.contains("olmoe"), "{s}");
    insta::assert_snapshot!("compare_olmoe_100x30", s);
    insta::assert_snapshot!("compare_olmoe_19x5", screen(&app, 19, 5));
    // every size draws (clipped), none panics
    for w in (1..=120).step_by(7) {
        for h in 1..=32 {
            screen(&app, w, h);
        }
    }
}

#[test]
fn the_routing_views_c_compares_with_another_format() {
    let (e, rx, first) = spawn();
    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(first));
    key(&mut app, KeyCode::F(2), KeyModifiers::NONE);
    let cmds = key(&mut app, KeyCode::Char('c'), KeyModifiers::NONE);
    let [Command::Compare {
        with: CompareWith::Format(Some(q)),
        ..
    }] = &cmds[..]
    else {
        panic!("a format comparison: {cmds:?}")
    };
    assert_eq!(q.format, QuantFormat::Int8, "int8 unless the picker chose another");
    assert!(app.cmp.in_routing && app.cmp.pending.is_some());
    let r = compare(&e, &rx, cmds[0].clone());
    let shares: Vec<String> = r.layers.iter().map(|f| format!("{:.1}%", f.flip_share() * 100.0)).collect();
    app.update(Msg::Engine(EngineEvent::Compare(r)));
    let s = screen(&app, 120, 30);
    assert!(
        s.contains("flips int8 vs f32") && shares.iter().all(|x| s.contains(x.as_str())),
        "{s}"
    );
    // c again hides the column
    assert!(key(&mut app, KeyCode::Char('c'), KeyModifiers::NONE).is_empty());
    assert!(!screen(&app, 120, 30).contains("flips int8"));
    e.shutdown();
}

#[test]
fn a_quantised_model_compares_with_its_dense_weights_reloaded() {
    let spec = LoadSpec {
        device: Some("cpu".into()),
        dtype: Some("f32".into()),
        quant: Some(QuantSpec::new(QuantFormat::Int8, &[], &[], true).unwrap()),
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let e = Engine::spawn(
        Source::Spec(spec),
        Box::new(move |ev| {
            let _ = tx.send(ev);
        }),
    )
    .unwrap();
    let evs = engine_common::until(&rx, WAIT, |ev| matches!(ev, EngineEvent::Loaded(_) | EngineEvent::Fatal(_)));
    let Some(EngineEvent::Loaded(info)) = evs.last() else {
        panic!("{evs:?}")
    };
    assert_eq!(info.quant.as_deref(), Some("int8"), "the loaded format reaches the UI");
    // the App's `f` on a quantised model asks for the dense weights
    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(EngineEvent::Loaded(info.clone())));
    key(&mut app, KeyCode::F(6), KeyModifiers::NONE);
    let cmds = key(&mut app, KeyCode::Char('f'), KeyModifiers::NONE);
    let [cmd @ Command::Compare {
        with: CompareWith::Format(None),
        ..
    }] = &cmds[..]
    else {
        panic!("a comparison with the dense weights: {cmds:?}")
    };
    let r = compare(&e, &rx, cmd.clone());
    assert!(r.same_model && r.same_tokens);
    assert_eq!((r.a.format.as_str(), r.b.format.as_str()), ("int8", "f32"));
    assert_eq!((r.a.label.as_str(), r.b.label.as_str()), ("embedded [int8]", "embedded"));
    e.shutdown();
}
