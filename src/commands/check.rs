//! `blackmamba check`: load a checkpoint, run a fixed prompt, report NaN/inf and speed, and, with a
//! reference logits file, top-1 agreement and the largest logit differences per position.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::commands::logits::teacher_forced;
use crate::commands::ModelArgs;
use crate::model::Logits;

/// The fixed prompt of `check` (a paragraph of plain English).
pub const CHECK_PROMPT: &str = "The history of the steam engine begins with simple devices that used heat to move water. \
Over the following centuries, engineers learned to turn that motion into useful work, and the machines grew larger, \
safer and more efficient.";

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A file written by `blackmamba logits` (with its `ids`) from a trusted implementation.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Token ids to check instead of the fixed prompt (needed for reference files without `ids`).
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<u32>,
    /// Decode steps timed for the throughput line.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Print the report as one JSON object on stdout (the exit status still tells pass or fail).
    #[arg(long)]
    pub json: bool,
}

/// `check --json`.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    ok: bool,
    model: String,
    layers: usize,
    vocab: usize,
    device: &'static str,
    dtype: String,
    load_s: f64,
    ttft_s: f64,
    prefill_tokens: usize,
    prefill_tok_s: f64,
    decode_steps: usize,
    decode_tok_s: f64,
    logits: usize,
    non_finite: usize,
    reference: Option<RefReport>,
}

/// The comparison with `--reference`.
#[derive(Debug, Default, serde::Serialize)]
struct RefReport {
    agree: usize,
    positions: usize,
    max_abs_diff: f32,
    /// Per position: top-1 here, top-1 there, max |Δ logits|.
    top1: Vec<u32>,
    top1_ref: Vec<u32>,
    max_abs_diff_per_position: Vec<f32>,
}

pub fn run(m: &ModelArgs, a: &CheckArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let loaded = super::load(m)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let model = &loaded.model;
    let dev = &model.device;
    let reference = match &a.reference {
        Some(p) => Some(candle_core::safetensors::load(p, &Device::Cpu).with_context(|| format!("reading reference {}", p.display()))?),
        None => None,
    };
    let ids: Vec<u32> = if !a.ids.is_empty() {
        a.ids.clone()
    } else if let Some(ids) = reference.as_ref().and_then(|r| r.get("ids")) {
        ids.to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
            .collect()
    } else {
        crate::tokenizer::encode(&loaded.tokenizer, CHECK_PROMPT)?
    };
    model.check_ids(&ids)?;

    // time to first token: load + prefill + first sample
    let t1 = Instant::now();
    let mut state = model.new_state(1)?;
    let last = model.forward(&Tensor::from_slice(&ids, (1, ids.len()), dev)?, &mut state, Logits::Last, None)?;
    let mut next = crate::sampling::argmax(&last.flatten_all()?.to_vec1::<f32>()?);
    let prefill_secs = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    for _ in 0..a.decode_steps {
        let l = model.step(&Tensor::from_slice(&[next], 1, dev)?, &mut state, None)?;
        next = crate::sampling::argmax(&l.flatten_all()?.to_vec1::<f32>()?);
    }
    let decode_secs = t2.elapsed().as_secs_f64();

    let (logits, _) = teacher_forced(model, &ids, false)?;
    let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let bad = flat.iter().filter(|x| !x.is_finite()).count();
    let mut rep = Report {
        ok: bad == 0,
        model: loaded.label.clone(),
        layers: model.cfg.num_layers,
        vocab: model.cfg.vocab_size,
        device: dev_name(dev),
        dtype: format!("{:?}", model.dtype).to_lowercase(),
        load_s: load_secs,
        ttft_s: load_secs + prefill_secs,
        prefill_tokens: ids.len(),
        prefill_tok_s: ids.len() as f64 / prefill_secs.max(1e-9),
        decode_steps: a.decode_steps,
        decode_tok_s: a.decode_steps as f64 / decode_secs.max(1e-9),
        logits: flat.len(),
        non_finite: bad,
        reference: None,
    };
    if let Some(r) = reference {
        let want = r
            .get("logits")
            .context("the reference file has no `logits` tensor")?
            .to_dtype(DType::F32)?;
        anyhow::ensure!(
            want.dims() == logits.dims(),
            "reference logits have shape {:?} but this model gives {:?} for these ids",
            want.dims(),
            logits.dims()
        );
        let (l, _) = logits.dims2()?;
        let ours = logits.argmax(1)?.to_vec1::<u32>()?;
        let theirs = want.argmax(1)?.to_vec1::<u32>()?;
        let diff = (&logits - &want)?.abs()?.max(1)?.to_vec1::<f32>()?;
        let agree = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
        rep.ok &= agree == l;
        rep.reference = Some(RefReport {
            agree,
            positions: l,
            max_abs_diff: diff.iter().copied().fold(0f32, f32::max),
            top1: ours,
            top1_ref: theirs,
            max_abs_diff_per_position: diff,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        print_report(&rep, model.dtype);
    }
    anyhow::ensure!(rep.ok, "check failed (see above)");
    Ok(())
}

fn print_report(rep: &Report, dtype: DType) {
    println!(
        "model: {} ({} layers, vocab {}), device: {}, dtype: {dtype:?}",
        rep.model, rep.layers, rep.vocab, rep.device
    );
    println!("load: {:.2} s; time to first token from start: {:.2} s", rep.load_s, rep.ttft_s);
    println!(
        "prefill: {} tokens at {:.1} tok/s; decode: {} steps at {:.1} tok/s",
        rep.prefill_tokens, rep.prefill_tok_s, rep.decode_steps, rep.decode_tok_s
    );
    println!("logits: {} values, {} NaN/inf", rep.logits, rep.non_finite);
    if let Some(r) = &rep.reference {
        println!(
            "reference: top-1 agreement {}/{}; max |Δ logits| {:.3e}",
            r.agree, r.positions, r.max_abs_diff
        );
        println!("position  top1(ours)  top1(ref)  max|Δ|");
        for p in 0..r.positions {
            let (o, t) = (r.top1[p], r.top1_ref[p]);
            println!(
                "{p:>8}  {o:>10}  {t:>9}  {:.3e}{}",
                r.max_abs_diff_per_position[p],
                if o == t { "" } else { "  <- differs" }
            );
        }
    }
}

fn dev_name(d: &Device) -> &'static str {
    if d.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}
