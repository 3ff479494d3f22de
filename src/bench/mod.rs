//! `blackmamba bench`: prefill and decode speed, launches per token, achieved bandwidth and GPU
//! memory of a model, measured with the project's own code paths:
//!
//! * `step-slow`: [`Model::step`] on the tensor-op path (the kernels' slow twin), host argmax;
//! * `step`: [`Model::step`] on the fused-kernel path (CUDA), host argmax;
//! * `eager` / `graph` / `graph-nopdl` / `pipelined` / `graph-probe`: the
//!   `crate::runtime::decode::Decoder` step, launched one kernel at a time, as one CUDA graph
//!   waiting for each token, the same without programmatic dependent launch, as graphs with two
//!   tokens in flight, and as a graph with the telemetry probe on (greedy, the bare kernels);
//! * `mega` (opt-in, not in the default list): the megakernel of
//!   `crate::runtime::megakernel::cuda`, one cooperative launch per token, host argmax;
//! * `user`: the path a user runs: [`crate::generate::generate`] with the default sampling
//!   settings (what `blackmamba generate` and the chat do), end-of-text ignored so every run
//!   decodes the same count.
//!
//! Times are wall-clock around synchronised work, after a warm-up. Launches per token are
//! counted (every kernel of the decoder goes through one counted launch function); cuBLAS and
//! candle's own kernels on the `step` paths are not counted and those rows say so.
//!
//! `bench --finetune` times the training step instead: see [`finetune`].

pub mod context;
pub mod context_plot;
pub mod device_random;
pub mod finetune;
pub mod finetune_profile;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::state::State;
use crate::model::{Logits, Model};
use crate::sampling::argmax;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub prompt_len: usize,
    pub prefill_batch: usize,
    pub gen_len: usize,
    /// Timed prefill repetitions (median reported).
    pub reps: usize,
    pub modes: Vec<String>,
    /// Tokens for the `step` modes (slow on big models), at most gen_len.
    pub step_tokens: usize,
    /// Also try launch shapes of the graph mode and report each.
    pub sweep: bool,
    pub seed: u64,
    /// Generated-token counts at which GPU memory is sampled.
    pub mem_points: Vec<usize>,
    /// Also time one prefill on the tensor-op path (the kernels' slow twin).
    pub slow_prefill: bool,
    /// Also break down one prefill and the decode step by kernel (synchronising between parts).
    pub profile: bool,
    /// Launch options of the decoder modes (probe and PDL are set per mode).
    #[cfg(feature = "cuda")]
    pub decode: crate::runtime::decode::DecodeOpts,
    /// Tokenizer of the `user` mode (it streams text as `generate` does).
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    pub batch: usize,
    pub prompt_len: usize,
    pub secs_median: f64,
    pub secs_all: Vec<f64>,
    pub tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub mode: String,
    pub tokens: usize,
    pub tok_s: f64,
    pub ms_p50: f64,
    pub ms_p99: f64,
    pub launches_per_token: Option<usize>,
    pub gb_s: f64,
    pub pct_of_measured_ceiling: Option<f64>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub threads: u32,
    pub blocks_per_sm: u32,
    pub split_k: u32,
    pub pdl: bool,
    pub tok_s: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct MemoryReport {
    /// MiB of device memory in use (all processes) after loading the model.
    pub after_load_mib: f64,
    pub after_prefill_mib: f64,
    /// (generated tokens, MiB in use) during the graph decode.
    pub during_decode_mib: Vec<(usize, f64)>,
    pub peak_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub params_total: usize,
    pub params_active: usize,
    /// Bytes of weights and state a decode step reads on the decoder's path (a quantised
    /// model's packed codes and scales, `--quant`).
    pub bytes_per_token: usize,
    /// The same over the dense copies of quantised matrices (what `step`, `step-slow`,
    /// `graph-dense` and the megakernel read); equal to `bytes_per_token` for a dense model.
    pub bytes_per_token_dense: usize,
    /// Device-to-device copy bandwidth measured here (bytes read + written per second), GB/s.
    pub hbm_copy_gb_s: Option<f64>,
    pub prefill: Option<PrefillResult>,
    /// The same prefill on the tensor-op path (one warm run, then one timed).
    pub prefill_slow: Option<PrefillResult>,
    pub decode: Vec<DecodeResult>,
    pub memory: Option<MemoryReport>,
    pub sweep: Vec<SweepRow>,
    /// Slowdown of `graph-probe` against `graph`, percent.
    pub probe_overhead_pct: Option<f64>,
    /// Prefill breakdown: (part, ms per prefill, calls per prefill), with a sync after each part.
    pub prefill_profile: Vec<(String, f64, usize)>,
    /// Decode step breakdown: (kernel, µs per token, launches per token), events around each.
    pub decode_profile: Vec<(String, f64, usize)>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

fn decode_result(mode: &str, times: &[f64], launches: Option<usize>, bytes: usize, ceiling: Option<f64>, note: &str) -> DecodeResult {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    let total: f64 = times.iter().sum();
    let tok_s = if total > 0.0 { times.len() as f64 / total } else { 0.0 };
    let gb_s = bytes as f64 * tok_s / 1e9;
    DecodeResult {
        mode: mode.to_string(),
        tokens: times.len(),
        tok_s,
        ms_p50: percentile(&s, 0.5) * 1e3,
        ms_p99: percentile(&s, 0.99) * 1e3,
        launches_per_token: launches,
        gb_s,
        pct_of_measured_ceiling: ceiling.map(|c| 100.0 * gb_s / c),
        note: note.to_string(),
    }
}

/// Runs the benchmark on a loaded model.
pub fn run(model: &mut Model, label: &str, o: &BenchOpts) -> Result<BenchReport> {
    if o.prompt_len == 0 {
        return Err(Error::Invalid("--prompt-len must be at least 1".into()));
    }
    let dev = model.device.clone();
    let (params_total, params_active) = model.cfg.param_counts();
    #[cfg(feature = "cuda")]
    let (bytes, dense_bytes) = (
        crate::runtime::decode::Decoder::bytes_per_token(model),
        crate::runtime::decode::Decoder::dense_bytes_per_token(model),
    );
    #[cfg(not(feature = "cuda"))]
    let (bytes, dense_bytes) = {
        let b = params_active * model.dtype.size_in_bytes();
        (b, b)
    };
    // the decoder reads packed weights; Model::step (--no-kernels, the CPU) the dense copies
    #[cfg(feature = "cuda")]
    let user_bytes = match model.runs_kernels() && model.kernels.decoder && crate::runtime::decode::Decoder::supports(model).is_ok() {
        true => bytes,
        false => dense_bytes,
    };
    #[cfg(not(feature = "cuda"))]
    let user_bytes = dense_bytes;
    let mut rep = BenchReport {
        model: label.to_string(),
        device: if dev.is_cuda() { "cuda".into() } else { "cpu".into() },
        dtype: format!("{:?}", model.dtype).to_lowercase(),
        params_total,
        params_active,
        bytes_per_token: bytes,
        bytes_per_token_dense: dense_bytes,
        hbm_copy_gb_s: None,
        prefill: None,
        prefill_slow: None,
        decode: Vec::new(),
        memory: None,
        sweep: Vec::new(),
        probe_overhead_pct: None,
        prefill_profile: Vec::new(),
        decode_profile: Vec::new(),
    };
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        rep.hbm_copy_gb_s = Some(cuda::copy_bandwidth(&dev)?);
        rep.memory = Some(MemoryReport {
            after_load_mib: cuda::used_mib(&dev)?,
            ..Default::default()
        });
    }
    // prefill
    let vocab = model.cfg.vocab_size.min(50277);
    let mut r = crate::rng::Rng::new(o.seed);
    let ids: Vec<u32> = (0..o.prompt_len * o.prefill_batch.max(1)).map(|_| r.below(vocab) as u32).collect();
    let b = o.prefill_batch.max(1);
    let ids_t = Tensor::from_slice(&ids, (b, o.prompt_len), &dev)?;
    let warm = Tensor::from_slice(&ids[..o.prompt_len.min(16)], (1, o.prompt_len.min(16)), &dev)?;
    model.forward(&warm, &mut model.new_state(1)?, Logits::Last, None)?;
    model.forward(&ids_t, &mut model.new_state(b)?, Logits::Last, None)?;
    sync(&dev)?;
    let mut secs = Vec::new();
    for _ in 0..o.reps.max(1) {
        let mut st = model.new_state(b)?;
        let t0 = Instant::now();
        let l = model.forward(&ids_t, &mut st, Logits::Last, None)?;
        let _host: Vec<f32> = l.flatten_all()?.to_vec1()?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let med = percentile(&sorted, 0.5);
    rep.prefill = Some(PrefillResult {
        batch: b,
        prompt_len: o.prompt_len,
        secs_median: med,
        secs_all: secs,
        tok_s: (b * o.prompt_len) as f64 / med,
    });
    if o.slow_prefill {
        let keep = model.kernels;
        model.kernels.enabled = false;
        model.forward(&warm, &mut model.new_state(1)?, Logits::Last, None)?;
        let mut st = model.new_state(b)?;
        let t0 = Instant::now();
        let l = model.forward(&ids_t, &mut st, Logits::Last, None)?;
        let _host: Vec<f32> = l.flatten_all()?.to_vec1()?;
        let secs = t0.elapsed().as_secs_f64();
        model.kernels = keep;
        rep.prefill_slow = Some(PrefillResult {
            batch: b,
            prompt_len: o.prompt_len,
            secs_median: secs,
            secs_all: vec![secs],
            tok_s: (b * o.prompt_len) as f64 / secs,
        });
    }
    // the batch-1 state and first token every decode mode starts from
    let ids1 = Tensor::from_slice(&ids[..o.prompt_len], (1, o.prompt_len), &dev)?;
    let mut st0 = model.new_state(1)?;
    let l = model.forward(&ids1, &mut st0, Logits::Last, None)?;
    let first = argmax(&l.flatten_all()?.to_vec1::<f32>()?);
    #[cfg(feature = "cuda")]
    if let Some(m) = rep.memory.as_mut() {
        m.after_prefill_mib = cuda::used_mib(&dev)?;
    }
    let ceiling = rep.hbm_copy_gb_s;
    for mode in &o.modes {
        match mode.as_str() {
            "step" | "step-slow" => {
                let keep = model.kernels;
                model.kernels.enabled = keep.enabled && mode == "step";
                let n = o.step_tokens.min(o.gen_len).max(2);
                let times = step_loop(model, &st0, first, n)?;
                model.kernels = keep;
                let note = if mode == "step" && model.runs_kernels() {
                    "Model::step on the fused kernels + cuBLAS; host argmax; launches not counted"
                } else {
                    "Model::step on the tensor-op path; host argmax; launches not counted"
                };
                rep.decode.push(decode_result(mode, &times, None, dense_bytes, ceiling, note));
            }
            #[cfg(feature = "cuda")]
            "eager" | "graph" | "pipelined" | "graph-probe" | "graph-nopdl" | "graph-dense" => {
                if !dev.is_cuda() {
                    return Err(Error::Invalid(format!("bench mode {mode} needs --device cuda")));
                }
                let opts = crate::runtime::decode::DecodeOpts {
                    probe: mode == "graph-probe",
                    pdl: o.decode.pdl && mode != "graph-nopdl",
                    packed: o.decode.packed && mode != "graph-dense",
                    ..o.decode
                };
                let bytes = if opts.packed { bytes } else { dense_bytes };
                let track = mode == "graph";
                let (res, mem) = cuda::decoder_run(
                    model,
                    &st0,
                    first,
                    opts,
                    mode,
                    o.gen_len,
                    bytes,
                    ceiling,
                    if track { &o.mem_points } else { &[] },
                )?;
                if let (Some(m), true) = (rep.memory.as_mut(), track) {
                    m.peak_mib = m.peak_mib.max(m.after_prefill_mib);
                    for &(t, mib) in &mem {
                        m.peak_mib = m.peak_mib.max(mib);
                        if o.mem_points.contains(&t) {
                            m.during_decode_mib.push((t, mib));
                        }
                    }
                }
                rep.decode.push(res);
            }
            #[cfg(feature = "cuda")]
            "mega" => {
                if !dev.is_cuda() {
                    return Err(Error::Invalid("bench mode mega needs --device cuda".into()));
                }
                let n = o.gen_len;
                rep.decode.push(cuda::mega_run(model, &st0, first, n, dense_bytes, ceiling)?);
            }
            "user" => {
                let tok = match &o.tokenizer {
                    Some(t) => t.clone(),
                    None => crate::tokenizer::neox()?,
                };
                rep.decode
                    .push(user_run(model, &tok, &ids[..o.prompt_len], o.gen_len, user_bytes, ceiling)?);
            }
            other => {
                return Err(Error::Invalid(format!(
                    "bench mode '{other}': use step, step-slow, user{}",
                    if cfg!(feature = "cuda") {
                        ", eager, graph, graph-nopdl, graph-dense, pipelined, graph-probe or mega (opt-in megakernel)"
                    } else {
                        " (the decoder modes need a build with --features cuda)"
                    }
                )))
            }
        }
    }
    let tok = |m: &str| rep.decode.iter().find(|d| d.mode == m).map(|d| d.tok_s);
    if let (Some(g), Some(p)) = (tok("graph"), tok("graph-probe")) {
        rep.probe_overhead_pct = Some(100.0 * (g - p) / g);
    }
    #[cfg(feature = "cuda")]
    if o.sweep && dev.is_cuda() {
        rep.sweep = cuda::sweep(model, &st0, first, o.gen_len.min(256), o.decode)?;
    }
    #[cfg(feature = "cuda")]
    if o.profile && dev.is_cuda() {
        crate::ops::prof::enable(true);
        let mut st = model.new_state(b)?;
        model.forward(&ids_t, &mut st, Logits::Last, None)?;
        rep.prefill_profile = crate::ops::prof::totals()
            .into_iter()
            .map(|(n, ms, c)| (n.to_string(), ms, c))
            .collect();
        crate::ops::prof::enable(false);
        let mut dec = crate::runtime::decode::Decoder::new(model, o.decode)?;
        dec.load_state(&st0)?;
        dec.set_token(first)?;
        rep.decode_profile = dec.profile(32)?.into_iter().map(|(n, us, c)| (n.to_string(), us, c)).collect();
    }
    Ok(rep)
}

/// The user's path: [`crate::generate::generate`] from the prompt `ids` with the default sampling
/// settings, `n` tokens (end-of-text ignored), after one warm-up generation. The time per token
/// comes from the generation's own decode timer (prefill and first sample excluded).
fn user_run(model: &Model, tok: &tokenizers::Tokenizer, ids: &[u32], n: usize, bytes: usize, ceiling: Option<f64>) -> Result<DecodeResult> {
    use crate::sampling::SamplingParams;
    let params = SamplingParams {
        max_tokens: n.max(2),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let warm = SamplingParams {
        max_tokens: 4,
        ..params.clone()
    };
    crate::generate::generate(model, tok, &mut model.new_state(1)?, ids, &warm, false, &cancel, |_| Ok(()))?;
    let out = crate::generate::generate(model, tok, &mut model.new_state(1)?, ids, &params, false, &cancel, |_| Ok(()))?;
    let steps = out.stats.gen_tokens.saturating_sub(1).max(1);
    let per = out.stats.decode_secs / steps as f64;
    let note = format!("generate, default sampling: {}", out.path);
    Ok(decode_result("user", &vec![per; steps], None, bytes, ceiling, &note))
}

/// Decodes `n` tokens with [`Model::step`] and host argmax; seconds per token.
fn step_loop(model: &Model, st0: &State, first: u32, n: usize) -> Result<Vec<f64>> {
    let dev = model.device.clone();
    let mut st = st0.clone();
    let mut id = first;
    // warm-up
    model.step(&Tensor::new(&[id], &dev)?, &mut st.clone(), None)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let l = model.step(&Tensor::new(&[id], &dev)?, &mut st, None)?; // (1, V)
        id = argmax(&l.flatten_all()?.to_vec1::<f32>()?);
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
}

#[cfg(feature = "cuda")]
mod cuda;

/// The default modes: everything this build and device can run.
pub fn default_modes(dev: &Device) -> Vec<String> {
    let mut m = vec!["step".to_string(), "user".to_string()];
    if cfg!(feature = "cuda") && dev.is_cuda() {
        m.extend(["eager", "graph", "graph-nopdl", "pipelined", "graph-probe"].map(String::from));
    }
    m
}

/// Picks the model dtype label for reports.
pub fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}
