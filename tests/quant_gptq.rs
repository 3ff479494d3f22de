//! GPTQ (the data-aware quantiser) on the embedded model: it lowers every layer's output error
//! against round-to-nearest on its calibration text, and `quantize --gptq` writes a checkpoint
//! that loads.

#![allow(clippy::unwrap_used)]

use blackmamba::commands::quantize::{run, QuantizeArgs, SAMPLE_TEXT};
use blackmamba::commands::{load, ModelArgs};
use blackmamba::quant::compare::compare;
use blackmamba::quant::gptq::quantize_model_gptq;
use blackmamba::quant::{quantize_model, QuantFormat, QuantSpec};
use candle_core::{DType, Device};

/// Held-out text for the perplexity comparison (not the calibration text).
const HELD_OUT: &str = "On the third morning the wind turned and the boats stayed in. The children \
ran along the sea wall, the old men argued about the tide tables, and the schoolteacher wrote to her \
sister that the winter would be long.";

#[test]
fn gptq_lowers_the_layer_output_error_of_round_to_nearest() {
    let (m, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let calib = blackmamba::tokenizer::encode(&tok, SAMPLE_TEXT).unwrap();
    let held = blackmamba::tokenizer::encode(&tok, HELD_OUT).unwrap();
    for f in [QuantFormat::Q4 { group: 64 }, QuantFormat::Int8] {
        let spec = QuantSpec::new(f, &[], &[], true).unwrap();
        let mut g = m.clone();
        let (sum, layers) = quantize_model_gptq(&mut g, &spec, &calib, 512, 0.01).unwrap();
        let mut r = m.clone();
        let rsum = quantize_model(&mut r, &spec).unwrap();
        assert_eq!(
            (sum.linears, sum.bytes_after),
            (rsum.linears, rsum.bytes_after),
            "{f}: the same layers, the same bytes"
        );
        // every layer the text reached: Mamba projections, and the experts it routed to
        assert!(layers.len() >= 12, "{f}: only {} layers calibrated", layers.len());
        let lower = layers.iter().filter(|l| l.gptq_error < l.rtn_error).count();
        let (rtn, gptq): (f64, f64) = layers.iter().fold((0.0, 0.0), |(a, b), l| (a + l.rtn_error, b + l.gptq_error));
        println!("{f}: GPTQ {gptq:.4e} vs RTN {rtn:.4e}, lower in {lower} of {} layers", layers.len());
        assert!(gptq < 0.9 * rtn, "{f}: GPTQ's total output error {gptq} is not below RTN's {rtn}");
        assert!(
            lower * 10 >= layers.len() * 9,
            "{f}: GPTQ lower in only {lower} of {} layers",
            layers.len()
        );
        let (cg, cr) = (
            compare(&m, &g, &held, 512, "gptq").unwrap(),
            compare(&m, &r, &held, 512, "rtn").unwrap(),
        );
        println!(
            "{f} held-out perplexity: RTN {:.3}, GPTQ {:.3} (unquantised {:.3})",
            cr.ppl_quant, cg.ppl_quant, cr.ppl_ref
        );
    }
}

#[test]
fn quantize_gptq_writes_a_checkpoint_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, SAMPLE_TEXT).unwrap();
    let out = dir.path().join("q4-gptq");
    let m = ModelArgs {
        device: Some(blackmamba::loader::DeviceArg::Cpu),
        quant: Some(QuantFormat::Q4 { group: 64 }),
        ..Default::default()
    };
    let a = QuantizeArgs {
        out: Some(out.clone()),
        compare: false,
        text: None,
        window: 512,
        json: None,
        gptq: Some(calib),
        gptq_damp: 0.01,
    };
    run(&m, &a).unwrap();
    let gptq = load(&ModelArgs {
        model: Some(out.display().to_string()),
        device: Some(blackmamba::loader::DeviceArg::Cpu),
        ..Default::default()
    })
    .unwrap();
    let rtn = load(&m).unwrap();
    let ids = blackmamba::tokenizer::encode(&gptq.tokenizer, HELD_OUT).unwrap();
    let c = compare(&rtn.model, &gptq.model, &ids, 512, "gptq vs rtn").unwrap();
    assert!(c.logits_rel_rms > 0.0, "the GPTQ checkpoint holds the round-to-nearest weights");
    assert!(c.ppl_quant.is_finite());
    let bad = QuantizeArgs {
        gptq: Some(dir.path().join("missing.txt")),
        ..a
    };
    let e = format!("{:#}", run(&m, &bad).unwrap_err());
    assert!(e.contains("missing.txt"), "{e}");
}
