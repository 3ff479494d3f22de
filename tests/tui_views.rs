#![allow(clippy::unwrap_used)]
//! Every view drawn on ratatui's TestBackend from synthetic engine events (insta snapshots), plus
//! robustness: every size down to 1×1, control bytes, large pastes.

use blackmamba::engine::protocol::{Command, EngineEvent, FinetuneCommand};
use blackmamba::tui::app::{App, Msg, View};
use blackmamba::tui::demo;
use blackmamba::tui::theme::Theme;
use blackmamba::tui::ui;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| ui::draw(app, f.area(), f.buffer_mut())).unwrap();
    term
}

fn key(app: &mut App, code: KeyCode, m: KeyModifiers) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(code, m)))
}

/// A demo-sized model (2 Mamba + 2 MoE layers of 8 experts) after two short turns.
fn small_app() -> App {
    let mut app = App::new(Theme::default_theme());
    let info = demo::model_info(2, 8, true);
    demo::conversation(&mut app, &info, 2, 12, 1);
    app.notice = None;
    app
}

fn screen(app: &App, w: u16, h: u16) -> String {
    format!("{}", draw(app, w, h).backend())
}

#[test]
fn chat_view() {
    let app = small_app();
    insta::assert_snapshot!("chat_80x24", screen(&app, 80, 24));
}

#[test]
fn chat_view_while_generating_with_sampling_focus() {
    let mut app = small_app();
    demo::type_and_send(&mut app, "and now?");
    key(&mut app, KeyCode::Char('p'), KeyModifiers::CONTROL);
    key(&mut app, KeyCode::Down, KeyModifiers::NONE);
    key(&mut app, KeyCode::Right, KeyModifiers::NONE);
    assert_eq!(app.chat.params.top_k, 45);
    app.notice = None;
    insta::assert_snapshot!("chat_busy_sampling_80x24", screen(&app, 80, 24));
}

#[test]
fn routing_view() {
    let mut app = small_app();
    app.view = View::Routing;
    for _ in 0..5 {
        key(&mut app, KeyCode::Up, KeyModifiers::NONE);
    }
    insta::assert_snapshot!("routing_80x24", screen(&app, 80, 24));
}

#[test]
fn sinkhorn_view() {
    let mut app = small_app();
    app.view = View::Sinkhorn;
    let cmds = key(&mut app, KeyCode::Char('+'), KeyModifiers::NONE);
    assert!(matches!(cmds[..], [Command::Sinkhorn { window: 128, .. }]));
    insta::assert_snapshot!("sinkhorn_80x24", screen(&app, 80, 24));
}

#[test]
fn state_view() {
    let mut app = small_app();
    app.view = View::State;
    key(&mut app, KeyCode::Right, KeyModifiers::NONE);
    assert_eq!(app.state_layer, 1);
    insta::assert_snapshot!("state_80x24", screen(&app, 80, 24));
}

#[test]
fn finetune_view_before_and_during_a_run() {
    let mut app = small_app();
    app.view = View::Finetune;
    let cmds = key(&mut app, KeyCode::Char('s'), KeyModifiers::NONE);
    assert!(matches!(cmds[..], [Command::Finetune(FinetuneCommand::Start(_))]));
    app.update(Msg::Engine(EngineEvent::Error {
        id: None,
        message: "data.jsonl: No such file or directory (os error 2)".into(),
    }));
    app.notice = None;
    insta::assert_snapshot!("finetune_start_failed_80x24", screen(&app, 80, 24));
    let mut app = small_app();
    app.view = View::Finetune;
    let info = app.model.clone().unwrap();
    demo::finetune(&mut app, &info, 60, 200);
    insta::assert_snapshot!("finetune_running_100x30", screen(&app, 100, 30));
}

#[test]
fn help_loading_and_fatal_screens() {
    let mut app = small_app();
    key(&mut app, KeyCode::Char('?'), KeyModifiers::NONE);
    assert!(app.help);
    insta::assert_snapshot!("help_80x24", screen(&app, 80, 24));
    for _ in 0..3 {
        key(&mut app, KeyCode::PageDown, KeyModifiers::NONE);
    }
    assert!(app.help, "scrolling keeps help open");
    assert!(screen(&app, 80, 24).contains("Alt-Backspace"), "PgDn scrolls");
    key(&mut app, KeyCode::End, KeyModifiers::NONE);
    let s = screen(&app, 80, 24);
    assert!(
        s.contains("any other key") && !s.contains("↓ more"),
        "the end of help is reachable:\n{s}"
    );
    key(&mut app, KeyCode::Char('x'), KeyModifiers::NONE);
    assert!(!app.help);

    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(EngineEvent::LoadProgress {
        stage: "loading Zyphra/BlackMamba-2.8B".into(),
        done: 1,
        total: 3,
    }));
    insta::assert_snapshot!("loading_80x24", screen(&app, 80, 24));
    app.update(Msg::Engine(EngineEvent::Fatal(
        "loading the model failed: --model x: no such folder".into(),
    )));
    insta::assert_snapshot!("fatal_80x24", screen(&app, 80, 24));
}

#[test]
fn small_terminals() {
    let app = small_app();
    insta::assert_snapshot!("chat_20x6", screen(&app, 20, 6));
    insta::assert_snapshot!("chat_19x5", screen(&app, 19, 5));
}

#[test]
fn tab_order_and_titles() {
    let mut app = small_app();
    let mut seen = vec![];
    for _ in 0..6 {
        seen.push(app.view.title());
        let s = screen(&app, 80, 24);
        assert!(s.contains(&format!("╭ {} ", app.view.title())), "{s}");
        assert!(s.contains("F1 Chat") && s.contains("F6 Compare"), "every tab fits 80 columns: {s}");
        key(&mut app, KeyCode::Tab, KeyModifiers::NONE);
    }
    assert_eq!(seen, ["Chat", "Routing", "Sinkhorn", "State", "Fine-tune", "Compare"]);
    assert_eq!(app.view, View::Chat);
    key(&mut app, KeyCode::BackTab, KeyModifiers::SHIFT);
    assert_eq!(app.view, View::Compare);
    let cmds = key(&mut app, KeyCode::F(3), KeyModifiers::NONE);
    assert_eq!(app.view, View::Sinkhorn);
    assert!(
        matches!(cmds[..], [Command::Sinkhorn { window: 64, .. }]),
        "entering the view refreshes it"
    );
}

#[test]
fn never_panics_at_any_size() {
    let mut app = small_app();
    let info = app.model.clone().unwrap();
    demo::finetune(&mut app, &info, 5, 10);
    for view in View::ALL {
        app.view = view;
        for help in [false, true] {
            app.help = help;
            for w in 1..=45 {
                for h in 1..=14 {
                    draw(&app, w, h);
                }
            }
            for (w, h) in [(1, 60), (200, 1), (200, 60), (81, 7), (33, 25)] {
                draw(&app, w, h);
            }
        }
    }
    // and before anything is loaded, with odd progress numbers
    let mut app = App::new(Theme::default_theme());
    app.update(Msg::Engine(EngineEvent::LoadProgress {
        stage: "x".into(),
        done: 9,
        total: 0,
    }));
    for w in 1..=30 {
        for h in 1..=10 {
            draw(&app, w, h);
        }
    }
}

#[test]
fn control_bytes_never_reach_the_screen() {
    let mut app = small_app();
    let cmds = demo::type_and_send(&mut app, "hi");
    let Some(Command::Chat { id, .. }) = cmds.into_iter().next() else {
        panic!("no chat command")
    };
    app.update(Msg::Engine(EngineEvent::TurnStarted {
        id,
        user: "evil\x1b[2J\x07".into(),
    }));
    let rec = blackmamba::engine::protocol::TokenRec {
        pos: 1000,
        piece: "\x1b]0;pwned\x07".into(),
        ..Default::default()
    };
    app.update(Msg::Engine(EngineEvent::Token {
        id,
        text: "a\x1b[31mred\rb\u{9b}c\u{202e}d".into(),
        rec: Box::new(rec),
    }));
    app.update(Msg::Paste("pasted\x1b[A\tx".into()));
    for view in View::ALL {
        app.view = view;
        let term = draw(&app, 80, 24);
        for cell in term.backend().buffer().content() {
            assert!(
                !cell
                    .symbol()
                    .chars()
                    .any(|c| c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c)),
                "{:?}",
                cell.symbol()
            );
        }
    }
}

#[test]
fn large_paste_is_kept_whole_and_drawn() {
    let mut app = small_app();
    let text = "line of pasted text\n".repeat(20_000);
    app.update(Msg::Paste(text.clone()));
    assert_eq!(app.chat.input.text, text);
    let s = screen(&app, 80, 24);
    assert!(s.contains("line of pasted text"));
    let cmds = key(&mut app, KeyCode::Enter, KeyModifiers::NONE);
    assert!(matches!(&cmds[..], [Command::Chat { text: t, .. }] if t.len() == text.trim().len()));
}

#[test]
fn escape_cancels_and_stale_events_are_dropped() {
    let mut app = small_app();
    let cmds = demo::type_and_send(&mut app, "go");
    let Some(Command::Chat { id, cancel, .. }) = cmds.into_iter().next() else {
        panic!()
    };
    key(&mut app, KeyCode::Esc, KeyModifiers::NONE);
    assert!(cancel.is_cancelled());
    let n = app.chat.messages.len();
    app.update(Msg::Engine(EngineEvent::TurnStarted {
        id: id + 7,
        user: "x".into(),
    }));
    assert_eq!(app.chat.messages.len(), n, "events of another request are ignored");
    // Ctrl-C while busy cancels without quitting; when idle it quits
    key(&mut app, KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert!(!app.quit);
    app.update(Msg::Engine(EngineEvent::Done {
        id,
        stats: Default::default(),
        stop: blackmamba::generate::StopReason::Cancelled,
    }));
    assert!(app.busy.is_none());
    key(&mut app, KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert!(app.quit);
}

#[test]
fn rewound_drops_turns_and_telemetry() {
    let mut app = small_app();
    assert_eq!(app.chat.messages.len(), 4);
    let n = app.tele.len();
    app.update(Msg::Engine(EngineEvent::Rewound { pos: 20, turns: 1 }));
    assert_eq!(app.chat.messages.len(), 2);
    assert!(app.tele.len() < n && app.tele.tokens.iter().all(|t| t.pos < 20));
}

#[test]
fn status_bar_reports_speed_and_bandwidth_on_gpu() {
    use blackmamba::generate::{GenStats, StopReason};
    let mut app = App::new(Theme::default_theme());
    let mut info = demo::model_info(2, 8, false);
    info.is_gpu = true;
    info.device = "cuda".into();
    info.dtype = "bf16".into();
    info.bytes_per_token = 2.0e9;
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info.clone()))));
    let stats = GenStats {
        prompt_tokens: 12,
        prefill_secs: 0.01,
        gen_tokens: 101,
        decode_secs: 1.0,
        ttft_secs: 0.05,
    };
    app.stats = Some((stats, StopReason::MaxTokens));
    let s = ui::status_text(&app);
    // 100 tok/s × 2 GB per token = 200 GB/s = 4.2% of 4.8 TB/s
    for part in [
        "prompt 12 tok",
        "TTFT 50 ms",
        "decode 100.0 tok/s",
        "cuda bf16",
        "200 GB/s = 4.2% of 4.8 TB/s",
    ] {
        assert!(s.contains(part), "{part:?} not in {s:?}");
    }
    info.is_gpu = false;
    info.device = "cpu".into();
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info))));
    assert!(!ui::status_text(&app).contains("GB/s"));
}

#[test]
fn expert_colouring_paints_generated_tokens_by_expert() {
    let mut app = small_app();
    let palette: Vec<_> = (0..8).map(|e| app.theme.expert_color(e)).collect();
    let colours_in_chat = |app: &App| {
        let term = draw(app, 80, 24);
        let buf = term.backend().buffer().clone();
        let mut found = std::collections::BTreeSet::new();
        for y in 3..20 {
            for x in 1..54 {
                let c = &buf[(x, y)];
                if let Some(i) = palette.iter().position(|&p| p == c.fg) {
                    if !c.symbol().trim().is_empty() {
                        found.insert(i);
                    }
                }
            }
        }
        found
    };
    assert!(colours_in_chat(&app).is_empty(), "no expert colours until switched on");
    key(&mut app, KeyCode::Char('t'), KeyModifiers::CONTROL);
    assert!(app.chat.color_experts);
    let found = colours_in_chat(&app);
    assert!(found.len() >= 3, "tokens take their experts' colours: {found:?}");
    // Ctrl-L picks the next MoE layer (half-block 3 of the demo model)
    key(&mut app, KeyCode::Char('l'), KeyModifiers::CONTROL);
    assert_eq!(app.chat.color_layer, 1);
    assert!(screen(&app, 80, 24).contains("expert colours layer 3"));
}

#[test]
fn finetune_form_edits_and_commands() {
    use blackmamba::engine::protocol::{FinetuneEvent, FinetuneMethod, FinetuneStatus};
    let mut app = small_app();
    app.view = View::Finetune;
    // dataset: Enter edits, typing replaces, Enter commits
    key(&mut app, KeyCode::Enter, KeyModifiers::NONE);
    for _ in 0.."data.jsonl".len() {
        key(&mut app, KeyCode::Backspace, KeyModifiers::NONE);
    }
    for c in "my?data.jsonl".chars() {
        key(&mut app, KeyCode::Char(c), KeyModifiers::NONE);
    }
    assert!(!app.help, "? is typed while editing a field");
    key(&mut app, KeyCode::Enter, KeyModifiers::NONE);
    assert_eq!(app.ft.spec.data, std::path::PathBuf::from("my?data.jsonl"));
    // method: Right cycles lora → router
    key(&mut app, KeyCode::Down, KeyModifiers::NONE);
    key(&mut app, KeyCode::Right, KeyModifiers::NONE);
    assert_eq!(app.ft.spec.method, FinetuneMethod::Router);
    // learning rate doubles
    for _ in 0..4 {
        key(&mut app, KeyCode::Down, KeyModifiers::NONE);
    }
    key(&mut app, KeyCode::Right, KeyModifiers::NONE);
    assert!((app.ft.spec.lr - 2e-4).abs() < 1e-12);
    let cmds = key(&mut app, KeyCode::Char('s'), KeyModifiers::NONE);
    match &cmds[..] {
        [Command::Finetune(FinetuneCommand::Start(spec))] => assert_eq!(**spec, app.ft.spec),
        other => panic!("{other:?}"),
    }
    // pause becomes resume once the engine says it is paused
    app.update(Msg::Engine(EngineEvent::Finetune(FinetuneEvent::Status(FinetuneStatus::Paused))));
    let cmds = key(&mut app, KeyCode::Char('p'), KeyModifiers::NONE);
    assert!(matches!(cmds[..], [Command::Finetune(FinetuneCommand::Resume)]));
    let cmds = key(&mut app, KeyCode::Char('u'), KeyModifiers::NONE);
    assert!(matches!(cmds[..], [Command::Finetune(FinetuneCommand::UseFinetuned(true))]));
}

#[test]
fn sinkhorn_view_of_a_training_batch() {
    use blackmamba::engine::protocol::{SinkhornLayer, SinkhornOrigin, SinkhornReport};
    use blackmamba::sinkhorn::{greedy, loads, sinkhorn, SinkhornOpts, Variant};
    let mut app = small_app();
    // the engine's report of a training step: the trainer's (Zyphra) run per MoE layer vs greedy
    let (t, e) = (64, 8);
    let mut rng = blackmamba::rng::Rng::new(5);
    let layers = [1, 3]
        .into_iter()
        .map(|layer| {
            let cost: Vec<f32> = (0..t * e)
                .map(|k| (2.0 * rng.uniform() - 1.0) as f32 + 0.5 * (k % e == 2) as u8 as f32)
                .collect();
            let g = greedy(&cost, t, e);
            let r = sinkhorn(&cost, t, e, &SinkhornOpts::default());
            SinkhornLayer {
                layer,
                n_experts: e,
                greedy_loads: loads(&g, e),
                runs: vec![blackmamba::engine::sinkhorn::summarize(&r, &g, Variant::Zyphra)],
            }
        })
        .collect();
    app.update(Msg::Engine(EngineEvent::Sinkhorn(Box::new(SinkhornReport {
        origin: SinkhornOrigin::Finetune { step: 42 },
        window: t,
        n_tokens: t,
        layers,
    }))));
    app.view = View::Sinkhorn;
    key(&mut app, KeyCode::Char('t'), KeyModifiers::NONE);
    let s = screen(&app, 100, 30);
    assert!(s.contains("training batch of step 42"), "{s}");
    insta::assert_snapshot!("sinkhorn_training_100x30", s);
}

/// A transformer MoE (4 layers of 64 experts, top-8): the grid shows each token's first expert,
/// the legend the id range, the detail all eight with their probabilities, the loads every choice.
#[test]
fn routing_view_top8_of_64_experts() {
    let mut app = App::new(Theme::default_theme());
    let info = demo::transformer_info(4, 64);
    demo::topk_conversation(&mut app, &info, 8, 12, 3);
    app.notice = None;
    app.view = View::Routing;
    for _ in 0..3 {
        key(&mut app, KeyCode::Up, KeyModifiers::NONE);
    }
    let s = screen(&app, 110, 30);
    assert!(s.contains("experts 0–63 24 tok top-8"), "{s}");
    let sel = &app.tele.tokens[app.tele.len() - 4];
    assert_eq!(sel.more[0].len(), 7);
    let detail = format!("{} {:.2}", sel.more[0][6].0, sel.more[0][6].1);
    assert!(s.contains(&detail), "the eighth expert of layer 0 ({detail}) is listed:\n{s}");
    let b = blackmamba::tui::store::balance(&app.tele, 0, 64);
    assert_eq!(b.loads.iter().sum::<usize>(), app.tele.len() * 8, "loads count all k choices");
    insta::assert_snapshot!("routing_top8_of_64_110x30", s);
    for (w, h) in [(40, 12), (20, 6), (1, 1)] {
        draw(&app, w, h);
    }
    // the other views of a model without Mamba layers draw too
    for v in [View::Chat, View::Sinkhorn, View::State, View::Finetune] {
        app.view = v;
        for (w, h) in [(110, 30), (40, 12)] {
            draw(&app, w, h);
        }
    }
}

/// The Sinkhorn view of a 64-expert layer lists the busiest experts that fit.
#[test]
fn sinkhorn_view_of_64_experts_lists_the_busiest() {
    let mut app = App::new(Theme::default_theme());
    let info = demo::transformer_info(2, 64);
    demo::topk_conversation(&mut app, &info, 8, 8, 5);
    let mut hist = blackmamba::engine::telemetry::RouterHistory::new(&info.moe_layers);
    let mut rng = blackmamba::rng::Rng::new(9);
    for t in 0..96 {
        for rows in hist.logits.iter_mut() {
            rows.extend((0..64).map(|e| rng.normal() as f32 + if e == t % 5 { 2.0 } else { 0.0 }));
        }
        hist.pos.push(t);
    }
    let report = blackmamba::engine::sinkhorn::window_report(&hist, 64, 200, 1e-4);
    app.update(Msg::Engine(EngineEvent::Sinkhorn(Box::new(report))));
    app.notice = None;
    app.view = View::Sinkhorn;
    let s = screen(&app, 110, 30);
    assert!(s.contains("of 64: greedy"), "{s}");
    for e in 0..5 {
        assert!(s.contains(&format!(" {e:>2} ")), "the favoured expert {e} is listed:\n{s}");
    }
    insta::assert_snapshot!("sinkhorn_64_experts_110x30", s);
}
