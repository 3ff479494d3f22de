//! Issue 17's megakernel, host side, on the CPU: the instruction encoding round-trips, every
//! schedule validates (no deadlock, no early read) under many interleavings, broken schedules
//! fail with a clear message, the released shapes balance, and the interpreter (the future
//! kernel's slow twin) matches `Model::step` token by token.

#![allow(clippy::unwrap_used)]

mod common;
mod mk_common;

use blackmamba::loader::load_dir;
use blackmamba::model::config::{Config, LayerKind};
use blackmamba::model::Model;
use blackmamba::rng::Rng;
use blackmamba::runtime::megakernel::validate::{check_static, simulate};
use blackmamba::runtime::megakernel::*;
use candle_core::{DType, Device};
use mk_common::{fixture, max_diff, odd_config, reference_step, route_diff, state_diff};

fn tiny_a_config() -> Config {
    Config::from_file(&fixture().join("config.json")).unwrap()
}

fn small_configs() -> Vec<(&'static str, Config)> {
    vec![
        ("tiny-a", tiny_a_config()),
        ("odd", odd_config()),
        ("tiny r/8/8/r", common::tiny_config(&["r", "8", "8", "r"], 32, 100)),
    ]
}

fn big_configs() -> Vec<(&'static str, Config)> {
    vec![("1.5B", Config::blackmamba_1_5b()), ("2.8B", Config::blackmamba_2_8b())]
}

/// Stages the design promises: two per Mamba layer, one per MoE or dense layer, one head.
fn expected_stages(cfg: &Config) -> usize {
    1 + (0..cfg.num_layers)
        .map(|i| if cfg.layer_kind(i) == LayerKind::Mamba { 2 } else { 1 })
        .sum::<usize>()
}

fn mixed_formats() -> FormatPlan {
    FormatPlan {
        in_proj: WeightFormat::Q4 { group: 64 },
        x_proj: WeightFormat::Bf16,
        dt_proj: WeightFormat::F32,
        out_proj: WeightFormat::Int8,
        fc1: WeightFormat::Fp8E4m3,
        fc2: WeightFormat::Q4 { group: 128 },
        head: WeightFormat::Int8,
    }
}

#[test]
fn every_instruction_round_trips_through_its_words() {
    assert_eq!(std::mem::size_of::<Encoded>(), 64);
    for (name, cfg) in small_configs().into_iter().chain(big_configs()) {
        for (sms, formats) in [
            (1, FormatPlan::default()),
            (7, mixed_formats()),
            (132, FormatPlan::uniform(WeightFormat::F32)),
        ] {
            let s = Schedule::build(
                &cfg,
                &ScheduleOpts {
                    formats,
                    ..ScheduleOpts::new(sms)
                },
            )
            .unwrap();
            for (e, i) in s.encode().unwrap().iter().flatten().zip(s.lists.iter().flatten()) {
                assert_eq!(&Instr::decode(e).unwrap(), i, "{name}, {sms} SMs");
            }
        }
    }
    let s = Schedule::build(&tiny_a_config(), &ScheduleOpts::new(3)).unwrap();
    let good = s.lists[0][0].encode().unwrap();
    for (word, value) in [(0, 0x99), (14, 1), (11, 0x0f0f), (0, good.words[0] ^ (1 << 8)), (8, 5)] {
        let mut bad = good;
        bad.words[word] = value;
        assert!(Instr::decode(&bad).is_err(), "word {word} = {value:#x} must not decode");
    }
}

#[test]
fn weight_formats_count_their_values_and_scales() {
    // 16 rows of 64 values: values, plus a 4-byte scale per row, or a 2-byte scale per group
    assert_eq!(WeightFormat::F32.bytes(16, 64), 16 * 64 * 4);
    assert_eq!(WeightFormat::Bf16.bytes(16, 64), 16 * 64 * 2);
    assert_eq!(WeightFormat::Int8.bytes(16, 64), 16 * 64 + 16 * 4);
    assert_eq!(WeightFormat::Fp8E4m3.bytes(16, 64), 16 * 64 + 16 * 4);
    assert_eq!(WeightFormat::Q4 { group: 32 }.bytes(16, 64), 16 * 32 + 16 * 2 * 2);
    assert_eq!(WeightFormat::Q4 { group: 32 }.bytes(1, 33), 17 + 2 * 2);
    assert!(WeightFormat::Q4 { group: 48 }.check().is_err());
    let bad = ScheduleOpts {
        formats: FormatPlan::uniform(WeightFormat::Q4 { group: 1 }),
        ..ScheduleOpts::new(4)
    };
    assert!(Schedule::build(&tiny_a_config(), &bad).is_err());
    assert!(Schedule::build(&tiny_a_config(), &ScheduleOpts::new(0)).is_err());
}

#[test]
fn schedules_validate_under_many_interleavings() {
    let seeds: Vec<u64> = (0..12).collect();
    for (name, cfg) in small_configs() {
        for sms in [1, 2, 5, 16, 132] {
            let s = Schedule::build(&cfg, &ScheduleOpts::new(sms)).unwrap();
            validate(&s, &seeds).unwrap_or_else(|e| panic!("{name}, {sms} SMs: {e}"));
            assert_eq!(s.stages(), Some(expected_stages(&cfg)), "{name}, {sms} SMs");
        }
    }
    for (name, cfg) in big_configs() {
        for sms in [78, 132] {
            let s = Schedule::build(&cfg, &ScheduleOpts::new(sms)).unwrap();
            validate(&s, &seeds[..3]).unwrap_or_else(|e| panic!("{name}, {sms} SMs: {e}"));
        }
    }
}

#[test]
fn released_shapes_balance_and_take_few_stages() {
    for (name, cfg) in big_configs() {
        let s = Schedule::build(&cfg, &ScheduleOpts::new(132)).unwrap();
        let st = s.stats();
        println!("{name} bf16: {st}");
        let q = Schedule::build(
            &cfg,
            &ScheduleOpts {
                formats: mixed_formats(),
                ..ScheduleOpts::new(132)
            },
        )
        .unwrap();
        println!("{name} mixed formats: {}", q.stats());
        assert_eq!(st.stages, expected_stages(&cfg), "{name}");
        assert!(st.balance() < 1.03, "{name}: busiest SM streams {:.4}x the mean", st.balance());
        assert!(
            st.worst_stage.1 < 1.10,
            "{name}: stage {} at {:.4}x its mean",
            st.worst_stage.0,
            st.worst_stage.1
        );
        assert!(
            q.stats().weight_bytes < st.weight_bytes * 3 / 4,
            "{name}: the mixed formats stream fewer bytes"
        );
        // the bf16 bytes a token streams are 2 bytes per active parameter, give or take the
        // small vectors (f32 conv, A, D, dt bias; norms and routers are read from L2)
        let (_, active) = cfg.param_counts();
        let ratio = st.weight_bytes as f64 / (2.0 * active as f64);
        assert!(
            (ratio - 1.0).abs() < 0.01,
            "{name}: {} bytes for {active} active parameters",
            st.weight_bytes
        );
        // every MoE tile has its next, router-independent tile to stream meanwhile
        assert!(st.moe_window_bytes > 0.0, "{name}");
    }
}

fn tiny_a_schedule(sms: usize) -> Schedule {
    Schedule::build(&tiny_a_config(), &ScheduleOpts::new(sms)).unwrap()
}

#[test]
fn a_dropped_producer_is_caught() {
    let mut s = tiny_a_schedule(4);
    let sm = s
        .lists
        .iter()
        .position(|l| l.iter().any(|i| i.op == OpKind::MambaSsm && i.layer == 0))
        .unwrap();
    s.lists[sm].retain(|i| !(i.op == OpKind::MambaSsm && i.layer == 0));
    let e = validate(&s, &[0]).unwrap_err().to_string();
    assert!(
        e.contains("RES[1]") && e.contains("expects 4 signals") && e.contains("3 instructions"),
        "{e}"
    );
}

#[test]
fn a_swap_across_a_dependency_deadlocks() {
    let mut s = tiny_a_schedule(4);
    let list = &mut s.lists[2];
    let a = list.iter().position(|i| i.op == OpKind::MambaIn && i.layer == 2).unwrap();
    let b = list.iter().position(|i| i.op == OpKind::MambaSsm && i.layer == 2).unwrap();
    list.swap(a, b);
    check_static(&s).unwrap(); // the counts still add up: only running it shows the problem
    for seed in 0..4 {
        let e = simulate(&s, seed).unwrap_err().to_string();
        assert!(e.contains("deadlock") && e.contains("SM 2") && e.contains("XP[2]"), "{e}");
    }
}

#[test]
fn a_missing_or_short_wait_is_caught() {
    let mut s = tiny_a_schedule(4);
    for i in s.lists.iter_mut().flatten().filter(|i| i.op == OpKind::MambaSsm && i.layer == 2) {
        i.waits.clear();
    }
    check_static(&s).unwrap();
    let errs: Vec<String> = (0..12).filter_map(|seed| simulate(&s, seed).err()).map(|e| e.to_string()).collect();
    assert!(!errs.is_empty(), "no interleaving ran a tile before its inputs were written");
    assert!(
        errs.iter().all(|e| e.contains("before") && e.contains("finished writing")),
        "{errs:?}"
    );
    let mut s = tiny_a_schedule(4);
    s.lists[1]
        .iter_mut()
        .filter(|i| i.op == OpKind::Head)
        .for_each(|i| i.waits[0].target -= 1);
    let e = validate(&s, &[0]).unwrap_err().to_string();
    assert!(e.contains("SM 1") && e.contains("waits for 3 signals on RES[4]"), "{e}");
}

/// Feeds the same random tokens to `Model::step` and to one interpreter per (SM count, seed),
/// comparing logits, routes and states after every token; returns the largest differences of
/// logits, router probabilities and states, each relative to the scale of the values compared
/// (max |Δ| / (1 + max |value|) of that token's vector).
fn parity(model: &Model, sms: &[usize], seeds: &[u64], tokens: usize) -> (f32, f32, f32) {
    let cfg = &model.cfg;
    let w = HostWeights::from_model(model).unwrap();
    let scheds: Vec<Schedule> = sms
        .iter()
        .map(|&n| {
            let opts = ScheduleOpts {
                formats: FormatPlan::uniform(WeightFormat::F32), // the weights as Model::step has them
                ..ScheduleOpts::new(n)
            };
            let s = Schedule::build(cfg, &opts).unwrap();
            validate(&s, seeds).unwrap();
            s
        })
        .collect();
    let mut runs: Vec<(Interpreter, HostState, u64)> = scheds
        .iter()
        .flat_map(|s| seeds.iter().map(move |&seed| (s, seed)))
        .map(|(s, seed)| (Interpreter::new(s, &w).unwrap(), HostState::zeros(cfg), seed))
        .collect();
    let mut state = model.new_state(1).unwrap();
    let mut rng = Rng::new(17);
    let (mut dl, mut dp, mut ds) = (0f32, 0f32, 0f32);
    for t in 0..tokens {
        let tok = rng.below(cfg.vocab_size) as u32;
        let (want, probe, want_state) = reference_step(model, &mut state, tok);
        for (interp, st, seed) in runs.iter_mut() {
            let got = interp
                .step(tok, st, *seed ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .unwrap();
            assert_eq!(got.logits.len(), want.len());
            dl = dl.max(max_diff(&got.logits, &want));
            dp = dp.max(route_diff(&got, &probe, t));
            ds = ds.max(state_diff(st, &want_state));
        }
    }
    (dl, dp, ds)
}

/// Tolerance of [`parity`]'s relative differences. f32 rounds at u = 6e-8; the interpreter sums
/// every dot product in another order than candle's gemm (split-K tiles added in the order the
/// simulated SMs finish, no SIMD lanes): worst case n·u of the magnitude per product (n up to
/// 2·d_inner = 256 here: 1.5e-5), typically √n·u (1e-6), compounding through the layers and the
/// recurrent state. 1e-5 of the scale is ~170 ulps: above what reordering gives (measured up
/// to ~2e-6), far below what a wrong tile gives (a missing bias, residual, gate or a shifted
/// row range moves values by 1e-2 and more).
const TOL: f32 = 1e-5;

#[test]
fn interpreter_matches_model_step_on_tiny_a() {
    let model = load_dir(&fixture(), &Device::Cpu, DType::F32).unwrap().0;
    let (dl, dp, ds) = parity(&model, &[3, 16], &[1, 2, 3], 512);
    println!("tiny-a, 512 tokens: max relative |Δ| logits {dl:e}, router probs {dp:e}, states {ds:e}");
    assert!(dl < TOL && dp < TOL && ds < TOL, "logits {dl:e}, probs {dp:e}, states {ds:e}");
}

#[test]
fn interpreter_matches_model_step_on_an_odd_config() {
    let model = common::tiny_model(&odd_config(), 5);
    let (dl, dp, ds) = parity(&model, &[1, 7], &[4, 5, 6], 512);
    println!("odd config, 512 tokens: max relative |Δ| logits {dl:e}, router probs {dp:e}, states {ds:e}");
    assert!(dl < TOL && dp < TOL && ds < TOL, "logits {dl:e}, probs {dp:e}, states {ds:e}");
}

#[test]
fn interpreter_matches_model_step_on_edge_configs() {
    // the smallest sizes the loader accepts: one layer of each kind, d = 3 (dt_rank 1), N = 1,
    // K = 1 and 2, one hidden unit, two vocabulary rows; more SMs than rows
    let edge = |layers: &[&str], k: usize| {
        let json = serde_json::json!({
            "num_layers": layers.len(), "hidden_size": 3, "state_size": 1, "conv_dimension": k,
            "vocab_size": 2, "expansion_factor": 1, "mamba_moe_layers": layers,
            "ffn_hidden_size": 1, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 16
        });
        Config::from_json_str(&json.to_string()).unwrap()
    };
    for cfg in [edge(&["r"], 2), edge(&["2"], 4), edge(&["1"], 4), edge(&["9", "r", "r", "2"], 1)] {
        let model = common::tiny_model(&cfg, 9);
        let (dl, dp, ds) = parity(&model, &[1, 3, 132], &[0, 1], 32);
        assert!(
            dl < TOL && dp < TOL && ds < TOL,
            "{:?}: logits {dl:e}, probs {dp:e}, states {ds:e}",
            cfg.mamba_moe_layers
        );
        assert_eq!(
            Schedule::build(&cfg, &ScheduleOpts::new(132)).unwrap().stages(),
            Some(expected_stages(&cfg))
        );
    }
}

#[test]
fn the_cuda_header_mirrors_the_encoding() {
    use blackmamba::runtime::megakernel::isa::{word, FLAG_EXPERT, FLAG_FIRST, MAX_OPERANDS, MAX_WAITS, WORDS};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/megakernel_isa.cuh");
    let text = std::fs::read_to_string(path).unwrap();
    let header: std::collections::BTreeMap<String, u32> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("#define MK_")?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect();
    let mut rust: std::collections::BTreeMap<String, u32> = [
        ("WORDS", WORDS),
        ("MAX_WAITS", MAX_WAITS),
        ("MAX_OPERANDS", MAX_OPERANDS),
        ("W_HEAD", word::HEAD),
        ("W_LAYER", word::LAYER),
        ("W_ROW0", word::ROW0),
        ("W_ROW1", word::ROW1),
        ("W_TILE", word::TILE),
        ("W_TILES", word::TILES),
        ("W_WAIT0", word::WAIT0),
        ("W_SIGNAL", word::SIGNAL),
        ("W_FORMATS", word::FORMATS),
        ("W_BYTES_LO", word::BYTES_LO),
        ("W_BYTES_HI", word::BYTES_HI),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v as u32))
    .collect();
    rust.insert("FLAG_FIRST".into(), FLAG_FIRST);
    rust.insert("FLAG_EXPERT".into(), FLAG_EXPERT);
    for op in OpKind::ALL {
        rust.insert(format!("OP_{}", op.name().to_uppercase()), op.code());
    }
    for (name, f) in [
        ("F32", WeightFormat::F32),
        ("BF16", WeightFormat::Bf16),
        ("FP8_E4M3", WeightFormat::Fp8E4m3),
        ("INT8", WeightFormat::Int8),
        ("Q4", WeightFormat::Q4 { group: 2 }),
    ] {
        rust.insert(format!("FMT_{name}"), u32::from(f.code() & 15));
    }
    assert_eq!(header, rust, "kernels/megakernel_isa.cuh and isa.rs disagree");
}
