//! The GPU-only parts of the benchmark: the copy-bandwidth ceiling, device memory, and the
//! decode loops of the [`Decoder`] (eager, graph, pipelined, probe) and their launch-shape sweep.
#![allow(unsafe_code)]

use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::result as cu;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Tensor};

use super::{decode_result, DecodeResult, SweepRow};
use crate::error::Result;
use crate::model::state::State;
use crate::model::Model;
use crate::ops::cuda::{cuda_device, dptr, mem_info};
use crate::runtime::decode::{DecodeOpts, Decoder};

/// MiB of device memory in use (total − free), all processes.
pub fn used_mib(dev: &Device) -> Result<f64> {
    let (free, total) = mem_info(cuda_device(dev)?)?;
    Ok((total - free) as f64 / (1024.0 * 1024.0))
}

/// Device-to-device copy of 1 GiB, 10 times after a warm-up: (read + written bytes) / time, GB/s.
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = 1usize << 28; // f32 elements = 1 GiB
    let src = Tensor::ones(n, DType::F32, dev)?;
    let dst = Tensor::zeros(n, DType::F32, dev)?;
    let cd = cuda_device(dev)?;
    let stream = cd.cuda_stream();
    let (s, d) = (dptr(&src)?, dptr(&dst)?);
    let copy = || -> Result<()> {
        // SAFETY: both buffers hold n f32 and live until the end of this function.
        unsafe { cu::memcpy_dtod_async(d, s, n * 4, stream.cu_stream()) }.w()?;
        Ok(())
    };
    copy()?;
    stream.synchronize().w()?;
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        copy()?;
    }
    stream.synchronize().w()?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((2 * n * 4 * reps) as f64 / secs / 1e9)
}

/// Runs `n` decode steps of a fresh [`Decoder`] from (`st0`, `first`): eager, graph, pipelined
/// (two graphs, two tokens in flight) or graph with the probe, per `mode`. Returns the result and
/// (generated tokens, MiB in use) samples at `mem_points` and every 1024 tokens.
#[allow(clippy::too_many_arguments)]
pub fn decoder_run(
    model: &Model,
    st0: &State,
    first: u32,
    opts: DecodeOpts,
    mode: &str,
    n: usize,
    bytes: usize,
    ceiling: Option<f64>,
    mem_points: &[usize],
) -> Result<(DecodeResult, Vec<(usize, f64)>)> {
    let dev = &model.device;
    let mut dec = Decoder::new(model, opts)?;
    // warm-up step (modules loaded), then back to the start
    dec.load_state(st0)?;
    dec.set_token(first)?;
    dec.step()?;
    dec.load_state(st0)?;
    dec.set_token(first)?;
    if mode != "eager" {
        dec.capture()?;
    }
    let mut times = Vec::with_capacity(n);
    let mut mem = Vec::new();
    let sample_mem = |i: usize, mem: &mut Vec<(usize, f64)>| -> Result<()> {
        if mem_points.contains(&i) || (!mem_points.is_empty() && i % 1024 == 0) {
            mem.push((i, used_mib(dev)?));
        }
        Ok(())
    };
    if mode == "pipelined" {
        dec.enqueue(0)?;
        let mut ev = [Some(dec.record()?), None];
        let mut last = Instant::now();
        for i in 0..n {
            let cur = i % 2;
            let nxt = 1 - cur;
            if i + 1 < n {
                dec.enqueue(nxt)?;
                ev[nxt] = Some(dec.record()?);
            }
            if let Some(e) = ev[cur].take() {
                e.synchronize().w()?;
            }
            let _tok = dec.token(cur);
            let now = Instant::now();
            times.push((now - last).as_secs_f64());
            last = now;
        }
    } else {
        for i in 0..n {
            let t0 = Instant::now();
            let _tok = dec.step()?;
            times.push(t0.elapsed().as_secs_f64());
            sample_mem(i + 1, &mut mem)?;
        }
    }
    let note = match mode {
        "eager" => "our kernels launched one by one, sync per token",
        "graph-nopdl" => "one CUDA graph per token, no PDL, sync per token",
        "graph" => "one CUDA graph per token, sync per token",
        "graph-dense" => "one CUDA graph per token over the dense copies of quantised weights, sync per token",
        "pipelined" => "one CUDA graph per token, two tokens in flight",
        _ => "one CUDA graph per token with the telemetry probe, sync per token",
    };
    Ok((
        decode_result(mode, &times, Some(dec.launches_per_token()), bytes, ceiling, note),
        mem,
    ))
}

/// The megakernel (`runtime::megakernel::cuda`, opt-in) for `n` tokens from `st0`: one
/// cooperative launch per token, then the logits copied to the host and their argmax taken.
pub fn mega_run(model: &Model, st0: &State, first: u32, n: usize, bytes: usize, ceiling: Option<f64>) -> Result<DecodeResult> {
    use crate::runtime::megakernel::cuda::{MegaDecoder, MegaOpts};
    use crate::runtime::megakernel::{FormatPlan, HostState, WeightFormat};
    let format = match model.dtype {
        DType::BF16 => WeightFormat::Bf16,
        _ => WeightFormat::F32,
    };
    let opts = MegaOpts {
        formats: FormatPlan::uniform(format),
        ..Default::default()
    };
    let mut mega = MegaDecoder::new(model, &model.device, &opts)?;
    mega.load_state(&HostState::from_state(st0)?)?;
    let mut tok = first;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let out = mega.step(tok)?;
        tok = crate::sampling::argmax(&out.logits);
        times.push(t0.elapsed().as_secs_f64());
    }
    let note = "the megakernel: one cooperative launch per token, logits to the host, host argmax";
    Ok(decode_result("mega", &times, Some(1), bytes, ceiling, note))
}

/// Graph-mode tok/s over a grid of launch options around `base` (`n` tokens each): PDL on and
/// off, blocks per SM, split-K.
pub fn sweep(model: &Model, st0: &State, first: u32, n: usize, base: DecodeOpts) -> Result<Vec<SweepRow>> {
    let mut rows = Vec::new();
    for pdl in [true, false] {
        for blocks_per_sm in [4u32, 8] {
            for split_k in [1u32, 2, 4] {
                let opts = DecodeOpts {
                    blocks_per_sm,
                    split_k,
                    pdl,
                    ..base
                };
                let (r, _) = decoder_run(model, st0, first, opts, "graph", n, 0, None, &[])?;
                rows.push(SweepRow {
                    threads: opts.threads,
                    blocks_per_sm,
                    split_k,
                    pdl,
                    tok_s: r.tok_s,
                });
            }
        }
    }
    Ok(rows)
}

/// Samples the device memory in use every millisecond on a thread of its own, keeping the
/// maximum: the peak of the work the calling thread runs meanwhile. Dropping it stops the thread.
pub struct MemSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<f64>>>,
}

impl MemSampler {
    /// Starts sampling the device of `dev`.
    pub fn start(dev: &Device) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let first = used_mib(dev)?;
        let ctx = cuda_device(dev)?.cuda_stream().context().clone();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || -> Result<f64> {
            ctx.bind_to_thread().w()?;
            let used = || -> Result<f64> {
                let (free, total) = cu::mem_get_info().w()?;
                Ok((total - free) as f64 / (1024.0 * 1024.0))
            };
            let mut peak = first;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(used()?);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(peak.max(used()?))
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops sampling; the most MiB in use seen.
    pub fn stop(mut self) -> Result<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| crate::error::Error::Invalid("the GPU memory sampler thread panicked".into()))?,
            None => Ok(0.0),
        }
    }
}

impl Drop for MemSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
