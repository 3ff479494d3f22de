//! Weight formats of the megakernel (issues 17 and 22) on the CPU: packed tiles are sized as the
//! schedule counts them, self-contained and within each format's rounding; the interpreter
//! computes with exactly the dequantised weights of its schedule's format plan.

#![allow(clippy::unwrap_used)]

mod mk_common;

use std::path::Path;

use blackmamba::loader::load_dir;
use blackmamba::model::Model;
use blackmamba::rng::Rng;
use blackmamba::runtime::megakernel::pack::{fp8_code, fp8_value, pack, unpack};
use blackmamba::runtime::megakernel::*;
use candle_core::{DType, Device, Tensor};
use mk_common::{dequantised, max_diff, reference_step, route_diff};

const FORMATS: [WeightFormat; 6] = [
    WeightFormat::F32,
    WeightFormat::Bf16,
    WeightFormat::Fp8E4m3,
    WeightFormat::Int8,
    WeightFormat::Q4 { group: 16 },
    WeightFormat::Q4 { group: 64 },
];

/// 37 x 70 values, each row on its own scale; row 3 all zero, row 4 one large value.
fn matrix() -> Vec<f32> {
    let mut rng = Rng::new(3);
    let mut w: Vec<f32> = (0..37 * 70).map(|i| (rng.normal() * 10f64.powi(i / 70 % 5 - 3)) as f32).collect();
    w[3 * 70..4 * 70].fill(0.0);
    w[4 * 70 + 9] = 300.0;
    w
}

#[test]
fn packed_tiles_are_sized_self_contained_and_within_rounding() {
    let (rows, cols) = (37, 70);
    let w = matrix();
    for fmt in FORMATS {
        let bytes = pack(&w, rows, cols, fmt).unwrap();
        assert_eq!(bytes.len() as u64, fmt.bytes(rows, cols), "{fmt:?}");
        let all = unpack(&bytes, rows, cols, fmt).unwrap();
        let rb = fmt.bytes(1, cols) as usize;
        let tile = unpack(&bytes[5 * rb..19 * rb], 14, cols, fmt).unwrap();
        assert_eq!(tile, all[5 * cols..19 * cols], "{fmt:?}: a tile of rows 5..19 unpacks alone");
        for (r, (row, got)) in w.chunks(cols).zip(all.chunks(cols)).enumerate() {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, (&x, &y)) in row.iter().zip(got).enumerate() {
                let e = (x - y).abs();
                let group_max = |g: usize| row[j / g * g..((j / g + 1) * g).min(cols)].iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = match fmt {
                    WeightFormat::F32 => 0.0,
                    WeightFormat::Bf16 => x.abs() * 2f32.powi(-8),
                    WeightFormat::Int8 => amax / 127.0 * 0.5001,
                    // 3 mantissa bits: half a step is 2^-4 of the value; subnormals step 2^-9 of the scale
                    WeightFormat::Fp8E4m3 => (x.abs() * 2f32.powi(-4)).max(amax / 448.0 * 2f32.powi(-10)) * 1.0001,
                    WeightFormat::Q4 { group } => group_max(group as usize) / 7.0 * 0.501,
                };
                assert!(e <= bound, "{fmt:?} row {r} col {j}: {x} came back as {y} (bound {bound})");
            }
        }
    }
    assert!(unpack(&[0u8; 10], 1, 70, WeightFormat::Int8).is_err());
    assert!(pack(&w, 36, cols, WeightFormat::Bf16).is_err());
}

#[test]
fn fp8_codes_follow_the_e4m3_grid() {
    // e4m3 (OCP FP8): bias 7, 3 mantissa bits, no infinities, max 448, smallest subnormal 2^-9
    for (x, code) in [
        (448.0, 0x7e),
        (1.0, 0x38),
        (-2.0, 0xc0),
        (2f32.powi(-9), 0x01),
        (2f32.powi(-6), 0x08),
        (0.0, 0x00),
    ] {
        assert_eq!(fp8_code(x), code, "{x}");
        assert_eq!(fp8_value(code), x, "{code:#x}");
    }
    assert_eq!(fp8_code(1e6), 0x7e, "saturates");
    assert_eq!(fp8_code(1.0625), 0x38, "a tie goes to the even code");
    assert!(fp8_value(0x7f).is_nan());
    for code in 0..0x7eu8 {
        assert!(fp8_value(code) < fp8_value(code + 1));
        assert_eq!(fp8_code(fp8_value(code)), code);
    }
}

/// Largest |Δ| / (1 + max |want|) of the logits over `tokens` random tokens, the interpreter
/// of `plan` against `Model::step` of `reference`; routes must agree.
fn run(model: &Model, reference: &Model, plan: FormatPlan, tokens: usize) -> f32 {
    let w = HostWeights::from_model_in(model, &plan).unwrap();
    let s = Schedule::build(
        &model.cfg,
        &ScheduleOpts {
            formats: plan,
            ..ScheduleOpts::new(5)
        },
    )
    .unwrap();
    let mut interp = Interpreter::new(&s, &w).unwrap();
    let (mut hs, mut state) = (HostState::zeros(&model.cfg), reference.new_state(1).unwrap());
    let mut rng = Rng::new(23);
    let mut worst = 0f32;
    for t in 0..tokens {
        let tok = rng.below(model.cfg.vocab_size) as u32;
        let (want, probe, _) = reference_step(reference, &mut state, tok);
        let got = interp.step(tok, &mut hs, t as u64).unwrap();
        route_diff(&got, &probe, t);
        worst = worst.max(max_diff(&got.logits, &want));
    }
    worst
}

#[test]
fn the_interpreter_computes_with_its_plans_dequantised_weights() {
    let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a"));
    let model = load_dir(fixture, &Device::Cpu, DType::F32).unwrap().0;
    let mixed = FormatPlan {
        in_proj: WeightFormat::Q4 { group: 32 },
        x_proj: WeightFormat::Bf16,
        dt_proj: WeightFormat::Int8,
        out_proj: WeightFormat::Int8,
        fc1: WeightFormat::Fp8E4m3,
        fc2: WeightFormat::Q4 { group: 16 },
        head: WeightFormat::Int8,
    };
    let plans = [
        WeightFormat::Bf16,
        WeightFormat::Fp8E4m3,
        WeightFormat::Int8,
        WeightFormat::Q4 { group: 32 },
    ]
    .map(FormatPlan::uniform)
    .into_iter()
    .chain([mixed]);
    for plan in plans {
        let reference = dequantised(&model, &plan);
        // same dequantised weights: only the order of the sums differs (tolerance as in
        // tests/megakernel_sched.rs)
        let d = run(&model, &reference, plan, 48);
        assert!(d < 1e-5, "{plan:?}: max relative |Δ logits| {d:e} against the dequantised model");
        // and the format was applied: against the f32 model the logits move by far more
        let f = {
            let w = HostWeights::from_model_in(&model, &plan).unwrap();
            let s = Schedule::build(
                &model.cfg,
                &ScheduleOpts {
                    formats: plan,
                    ..ScheduleOpts::new(5)
                },
            )
            .unwrap();
            let out = Interpreter::new(&s, &w)
                .unwrap()
                .step(7, &mut HostState::zeros(&model.cfg), 0)
                .unwrap();
            let want = model
                .step(
                    &Tensor::from_slice(&[7u32], 1, &Device::Cpu).unwrap(),
                    &mut model.new_state(1).unwrap(),
                    None,
                )
                .unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            out.logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
        };
        println!("{plan:?}: vs the dequantised model {d:e}; first token vs the f32 model {f:e}");
        // bf16, the finest format, moves tiny-a's first logits by ~4e-2; a plan that was not
        // applied would leave them within the 1e-5 of reordered sums
        assert!(f > 1e-3, "{plan:?}: the logits did not move off the f32 model's ({f:e})");
    }
    let w = HostWeights::from_model_in(&model, &FormatPlan::uniform(WeightFormat::Int8)).unwrap();
    let s = Schedule::build(&model.cfg, &ScheduleOpts::new(5)).unwrap();
    let e = Interpreter::new(&s, &w).err().unwrap().to_string();
    assert!(e.contains("from_model_in"), "{e}");
}
