//! Synthetic engine events (a made-up model and conversation with routing, state norms and
//! Sinkhorn reports) for the snapshot tests and the render benchmark. Deterministic for a seed.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::engine::protocol::{Command, EngineEvent, FinetuneEvent, FinetuneProgress, ModelInfo, ProbeRouting, Route, TokenRec};
use crate::engine::telemetry::RouterHistory;
use crate::generate::{GenStats, StopReason};
use crate::rng::Rng;
use crate::tui::app::{App, Msg};

/// A model description with `mamba` Mamba and `moe` MoE layers (alternating) of `experts` experts.
pub fn model_info(pairs: usize, experts: usize, untrained: bool) -> ModelInfo {
    ModelInfo {
        label: if untrained {
            "embedded".into()
        } else {
            "Zyphra/BlackMamba-2.8B".into()
        },
        untrained,
        device: "cpu".into(),
        is_gpu: false,
        dtype: "f32".into(),
        n_layers: 2 * pairs,
        moe_layers: (0..pairs).map(|i| (2 * i + 1, experts)).collect(),
        mamba_layers: (0..pairs).map(|i| 2 * i).collect(),
        d_model: 64,
        d_state: 16,
        vocab: 50304,
        params_total: 1_000_000,
        params_active: 400_000,
        bytes_per_token: 1.6e6,
        load_secs: 0.25,
        finetune_available: crate::engine::finetune::AVAILABLE,
        quant: None,
        notes: Vec::new(),
    }
}

const WORDS: [&str; 16] = [
    " the", " state", " space", " model", " routes", " each", " token", " to", " one", " expert", ",", " and", " Mamba", " mixes", " time",
    ".",
];

/// Types `text` into the app and presses Enter; returns the commands it sent.
pub fn type_and_send(app: &mut App, text: &str) -> Vec<Command> {
    for c in text.chars() {
        app.update(Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)));
    }
    app.update(Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)))
}

/// Synthetic telemetry of token `pos`.
pub fn token(info: &ModelInfo, pos: usize, generated: bool, rng: &mut Rng) -> TokenRec {
    let id = rng.below(WORDS.len()) as u32;
    let mut routes = Vec::new();
    for (slot, &(_, e)) in info.moe_layers.iter().enumerate() {
        // a skewed, slowly drifting preference per layer
        let favourite = (pos / 7 + slot) % e;
        let expert = if rng.uniform() < 0.45 { favourite } else { rng.below(e) };
        routes.push(Route {
            expert: expert as u16,
            prob: 0.3 + 0.6 * rng.uniform() as f32,
        });
    }
    let n = info.mamba_layers.len();
    TokenRec {
        pos,
        id,
        piece: WORDS[id as usize].to_string(),
        generated,
        routes,
        more: Vec::new(),
        ssm_norm: (0..n)
            .map(|k| (1.0 + k as f32) * (1.0 + (pos as f32 / 9.0).sin().abs()) + rng.uniform() as f32)
            .collect(),
        conv_norm: (0..n).map(|k| 0.5 + 0.1 * k as f32 + 0.3 * rng.uniform() as f32).collect(),
        mean_delta: (0..n).map(|k| 0.02 + 0.01 * k as f32 + 0.005 * rng.uniform() as f32).collect(),
    }
}

/// Loads `info` into the app and plays a conversation of `turns` turns with `answer` generated
/// tokens each, plus a Sinkhorn report over the last 64 tokens.
pub fn conversation(app: &mut App, info: &ModelInfo, turns: usize, answer: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info.clone()))));
    let mut pos = 0;
    let mut hist = RouterHistory::new(&info.moe_layers);
    for k in 0..turns {
        let cmds = type_and_send(app, &format!("Question {} about routing?", k + 1));
        let Some(Command::Chat { id, text, .. }) = cmds.into_iter().next() else {
            return;
        };
        app.update(Msg::Engine(EngineEvent::TurnStarted { id, user: text }));
        let prompt: Vec<TokenRec> = (0..8)
            .map(|_| {
                pos += 1;
                token(info, pos - 1, false, &mut rng)
            })
            .collect();
        for t in &prompt {
            push_logits(&mut hist, info, t, &mut rng);
        }
        app.update(Msg::Engine(EngineEvent::Prompt { id, tokens: prompt }));
        for _ in 0..answer {
            let rec = token(info, pos, true, &mut rng);
            push_logits(&mut hist, info, &rec, &mut rng);
            pos += 1;
            let text = rec.piece.clone();
            app.update(Msg::Engine(EngineEvent::Token {
                id,
                text,
                rec: Box::new(rec),
            }));
        }
        let stats = GenStats {
            prompt_tokens: 8,
            prefill_secs: 0.004,
            gen_tokens: answer,
            decode_secs: 0.01 * answer.saturating_sub(1) as f64,
            ttft_secs: 0.012,
        };
        app.update(Msg::Engine(EngineEvent::Done {
            id,
            stats,
            stop: StopReason::MaxTokens,
        }));
    }
    let report = crate::engine::sinkhorn::window_report(&hist, 64, 200, 1e-4);
    app.update(Msg::Engine(EngineEvent::Sinkhorn(Box::new(report))));
}

/// Router logits consistent with the token's chosen experts, appended as one row of the history.
fn push_logits(hist: &mut RouterHistory, info: &ModelInfo, t: &TokenRec, rng: &mut Rng) {
    for ((&(_, e), r), rows) in info.moe_layers.iter().zip(&t.routes).zip(hist.logits.iter_mut()) {
        rows.extend((0..e).map(|j| rng.normal() as f32 * 0.5 + if j == usize::from(r.expert) { 1.5 } else { 0.0 }));
    }
    hist.pos.push(t.pos);
}

/// A transformer MoE's description: `layers` decoder layers, each with `experts` experts.
pub fn transformer_info(layers: usize, experts: usize) -> ModelInfo {
    ModelInfo {
        label: "olmoe-demo".into(),
        untrained: true,
        device: "cpu".into(),
        is_gpu: false,
        dtype: "f32".into(),
        n_layers: layers,
        moe_layers: (0..layers).map(|i| (i, experts)).collect(),
        mamba_layers: Vec::new(),
        d_model: 64,
        d_state: 0,
        vocab: 50304,
        params_total: 1_000_000,
        params_active: 150_000,
        bytes_per_token: 6e5,
        load_secs: 0.25,
        finetune_available: false,
        quant: None,
        notes: Vec::new(),
    }
}

/// Synthetic top-k telemetry of token `pos`: k distinct experts per layer, best first, with
/// falling router probabilities.
pub fn topk_token(info: &ModelInfo, k: usize, pos: usize, generated: bool, rng: &mut Rng) -> TokenRec {
    let id = rng.below(WORDS.len()) as u32;
    let (mut routes, mut more) = (Vec::new(), Vec::new());
    for (slot, &(_, e)) in info.moe_layers.iter().enumerate() {
        let mut chosen: Vec<u16> = Vec::with_capacity(k);
        let favourite = ((pos / 5 + 3 * slot) % e) as u16;
        while chosen.len() < k.min(e) {
            let x = if chosen.is_empty() && rng.uniform() < 0.5 {
                favourite
            } else {
                rng.below(e) as u16
            };
            if !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        let mut p = 0.25 + 0.2 * rng.uniform() as f32;
        routes.push(Route {
            expert: chosen[0],
            prob: p,
        });
        more.push(
            chosen[1..]
                .iter()
                .map(|&x| {
                    p *= 0.7;
                    (x, p)
                })
                .collect(),
        );
    }
    TokenRec {
        pos,
        id,
        piece: WORDS[id as usize].to_string(),
        generated,
        routes,
        more,
        ..Default::default()
    }
}

/// Loads `info` and plays one turn of `tokens` prompt tokens and `tokens` generated ones with
/// top-`k` routing.
pub fn topk_conversation(app: &mut App, info: &ModelInfo, k: usize, tokens: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    app.update(Msg::Engine(EngineEvent::Loaded(Box::new(info.clone()))));
    let cmds = type_and_send(app, "Which experts?");
    let Some(Command::Chat { id, text, .. }) = cmds.into_iter().next() else {
        return;
    };
    app.update(Msg::Engine(EngineEvent::TurnStarted { id, user: text }));
    let prompt = (0..tokens).map(|p| topk_token(info, k, p, false, &mut rng)).collect();
    app.update(Msg::Engine(EngineEvent::Prompt { id, tokens: prompt }));
    for p in tokens..2 * tokens {
        let rec = topk_token(info, k, p, true, &mut rng);
        let text = rec.piece.clone();
        app.update(Msg::Engine(EngineEvent::Token {
            id,
            text,
            rec: Box::new(rec),
        }));
    }
    let stats = GenStats {
        prompt_tokens: tokens,
        prefill_secs: 0.004,
        gen_tokens: tokens,
        decode_secs: 0.01 * tokens as f64,
        ttft_secs: 0.012,
    };
    app.update(Msg::Engine(EngineEvent::Done {
        id,
        stats,
        stop: StopReason::MaxTokens,
    }));
}

/// Plays `steps` fine-tuning steps of a made-up run, with probe routing before and after.
pub fn finetune(app: &mut App, info: &ModelInfo, steps: usize, total: usize) {
    let mut rng = Rng::new(7);
    for s in 1..=steps {
        let loss = 3.0 * (-(s as f64) / 40.0).exp() + 1.2 + 0.05 * rng.uniform();
        app.update(Msg::Engine(EngineEvent::Finetune(FinetuneEvent::Progress(Box::new(
            FinetuneProgress {
                step: s,
                total_steps: total,
                loss,
                lr: 1e-4,
                grad_norm: 0.8,
                tokens_per_s: 5120.0,
                eval_loss: (s % 10 == 0).then_some(loss + 0.1),
                expert_load: vec![vec![4; 8]; info.moe_layers.len()],
                sinkhorn_iters: vec![12; info.moe_layers.len()],
                elapsed_secs: s as f64 * 0.5,
            },
        )))));
    }
    for after in [false, true] {
        let experts = info
            .moe_layers
            .iter()
            .map(|&(_, e)| (0..24).map(|t| ((t + usize::from(after) * 3) % e) as u16).collect())
            .collect();
        app.update(Msg::Engine(EngineEvent::Finetune(FinetuneEvent::ProbeRouting(Box::new(
            ProbeRouting {
                after,
                pieces: vec![],
                experts,
            },
        )))));
    }
}
