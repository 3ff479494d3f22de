//! The quantised decode on CUDA (issue 22): the decoder's packed-weight kernels
//! (`kernels/qgemv.cu`, the decode kernel bodies over `kernels/qweight.cuh`'s formats) against
//! their twin, the same decoder over the dense copies (`DecodeOpts::packed` off), token by token.
//!
//! The tolerances, from the arithmetic:
//! * f32: the twin's weights are f32(s·q), exact (an f16 scale times a code of at most 8
//!   significant bits); the kernels compute s·Σ q·x where the twin sums (s·q)·x. Only the order
//!   and placement of f32 roundings differ (~K·2⁻²⁴ of a product's magnitude), so the logits
//!   agree to 1e-4 of their scale at every step and every MoE layer takes the same expert.
//! * bf16: the twin holds bf16(s·q), rounded to 8 significant bits (relative error up to 2⁻⁹
//!   per weight); the kernels use the exact s·q and round activations where the twin does. So
//!   they skip one rounding the twin makes: against the exact quantised model (its f32 twin) they
//!   must be no less accurate than the bf16 twin (1.5× its error plus 1e-3 of the scale, the
//!   slack of the other bf16-vs-bf16 tests in `tests/gpu_parity.rs`), and within 3× of it from
//!   the twin itself. Compared at the steps where the f32 twin and both bf16 runs route alike (a
//!   route flip at a near tie moves logits by far more than rounding does).
//!
//! The GPU tests run only in a `--features cuda` build (`cargo test --features cuda --test
//! quant_gpu`), skipped with one line without a GPU unless `BLACKMAMBA_REQUIRE_GPU=1`. The CPU
//! tests at the top check the kernels' decoding arithmetic (their bit tricks, emulated on the
//! host) against the formats of `src/quant`.
#![allow(clippy::unwrap_used)]

use blackmamba::quant::{QWeight, QuantFormat};

mod common;

/// The four formats.
const FORMATS: [QuantFormat; 4] = [
    QuantFormat::Int8,
    QuantFormat::Fp8,
    QuantFormat::Q4 { group: 64 },
    QuantFormat::Q4 { group: 128 },
];

/// Elements of a format in one 16-byte load.
fn chunk(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4 { .. } => 32,
        _ => 16,
    }
}

/// The value `kernels/qweight.cuh` (`F::in_word`) decodes as code `i` of a little-endian word,
/// emulated: int8 by PRMT into 2²³ + (b + 128), fp8 by moving the byte's bits into an f32 times
/// 2¹²⁰, q4 by 2²³ + nibble.
fn in_word(format: QuantFormat, word: u32, i: usize) -> f32 {
    match format {
        QuantFormat::Int8 => {
            let byte = ((word ^ 0x8080_8080) >> (8 * i)) & 0xFF; // __byte_perm(.., 0x4B000000, 0x7440 | i)
            f32::from_bits(0x4B00_0000 | byte) - 8_388_736.0
        }
        QuantFormat::Fp8 => {
            let b = (word >> (8 * i)) & 0xFF;
            let bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20);
            f32::from_bits(bits) * f32::from_bits(0x7B80_0000)
        }
        QuantFormat::Q4 { .. } => f32::from_bits(0x4B00_0000 | ((word >> (4 * i)) & 0xF)) - 8_388_616.0,
    }
}

/// Element `n` of a 16-byte load: code `n % EW` of word `n / EW` (EW = chunk / 4 codes a word).
fn kernel_value(format: QuantFormat, words: [u32; 4], n: usize) -> f32 {
    let ew = chunk(format) / 4;
    in_word(format, words[n / ew], n % ew)
}

/// Σ value·x over chunk `c` of a row (its load `words`; x the whole vector) as `chunk_dot_x`
/// reads it with 16-bit activations: P = 8 activations a 16-byte piece, NX = C / P pieces read
/// from piece (c·S / 128) mod NX on (S = 2C bytes of x a chunk), wrapping; piece v holds the
/// codes of words v·P/EW .. + P/EW.
fn kernel_chunk_sum(format: QuantFormat, words: [u32; 4], x: &[f32], c: usize) -> f32 {
    let (cc, p) = (chunk(format), 8);
    let (ew, nx) = (cc / 4, cc / p);
    let wp = p / ew;
    let rot = ((c * cc * 2) >> 7) & (nx - 1);
    let mut s = 0f32;
    for piece in 0..nx {
        let v = (piece + rot) & (nx - 1);
        for wi in 0..wp {
            let word = words[v * wp + wi];
            for e in 0..ew {
                s += in_word(format, word, e) * x[c * cc + v * p + wi * ew + e];
            }
        }
    }
    s
}

#[test]
fn kernel_decoding_gives_every_code_its_value() {
    for format in FORMATS {
        // every byte value (fp8 without E4M3's NaN codes, which the quantiser never writes)
        for b in 0u32..=255 {
            if format == QuantFormat::Fp8 && (b & 0x7F) == 0x7F {
                continue;
            }
            let words = [b * 0x0101_0101; 4];
            for n in 0..chunk(format) {
                let want = match format {
                    QuantFormat::Q4 { .. } => QWeight::decode(format, ((b >> (4 * (n % 2))) & 0xF) as u8),
                    _ => QWeight::decode(format, b as u8),
                };
                assert_eq!(kernel_value(format, words, n), want, "{format} byte {b:#04x} element {n}");
            }
        }
    }
}

/// One row of a quantised matrix dotted with x as the kernels' vector path does it (16-bit
/// activations): 16-byte loads of codes (little-endian words), each chunk's sum Σ value·x
/// ([`kernel_chunk_sum`]) scaled once per row (int8, fp8) or per chunk by its group's scale (q4).
fn kernel_row_dot(w: &QWeight, row: usize, x: &[f32]) -> f32 {
    let rb = QWeight::row_bytes(w.format, w.cols);
    let codes = &w.data[row * rb..(row + 1) * rb];
    let c = chunk(w.format);
    let per_row = w.format.group().is_none();
    let mut acc = 0f32;
    for (ci, load) in codes.chunks(16).enumerate() {
        let words: [u32; 4] = std::array::from_fn(|q| u32::from_le_bytes([load[4 * q], load[4 * q + 1], load[4 * q + 2], load[4 * q + 3]]));
        let d = kernel_chunk_sum(w.format, words, x, ci);
        acc += match per_row {
            true => d,
            false => d * w.scales[row * w.cols / w.group_len() + ci * c / w.group_len()].to_f32(),
        };
    }
    match per_row {
        true => acc * w.scales[row].to_f32(),
        false => acc,
    }
}

#[test]
fn kernel_rows_dot_as_the_dequantised_matrix() {
    let (rows, cols) = (5, 256);
    let mut r = blackmamba::rng::Rng::new(3);
    let mut uniform = || r.below(1 << 20) as f32 / (1u32 << 20) as f32 - 0.5;
    // rows of growing magnitude with an outlier each, so groups take different scales
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| uniform() * (1.0 + (i / cols) as f32) * if i % 97 == 0 { 30.0 } else { 1.0 })
        .collect();
    let x: Vec<f32> = (0..cols).map(|_| uniform()).collect();
    for format in FORMATS {
        let q = QWeight::quantize(&w, rows, cols, format, "t").unwrap();
        let dq = q.dequantize();
        for row in 0..rows {
            let want: f64 = (0..cols).map(|k| f64::from(dq[row * cols + k]) * f64::from(x[k])).sum();
            let mag: f64 = (0..cols).map(|k| f64::from((dq[row * cols + k] * x[k]).abs())).sum();
            let got = f64::from(kernel_row_dot(&q, row, &x));
            assert!(
                (got - want).abs() <= 1e-4 * mag,
                "{format} row {row}: {got} vs {want} (Σ|w·x| {mag})"
            );
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu_common;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use blackmamba::loader::load_dir;
    use blackmamba::model::config::Config;
    use blackmamba::model::probe::Probe;
    use blackmamba::model::random::{random_weights, RandomInit};
    use blackmamba::model::{Logits, Model};
    use blackmamba::quant::apply::{for_each_linear, quantize_model};
    use blackmamba::quant::{Part, QLinear, QuantFormat, QuantSpec};
    use blackmamba::runtime::decode::{DecodeOpts, Decoder};
    use blackmamba::sampling::argmax;
    use candle_core::{DType, Device, Tensor};

    use super::common::random_ids;
    use super::{gpu_common, FORMATS};

    /// One test at a time on the GPU.
    static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn gpu() -> Option<(std::sync::MutexGuard<'static, ()>, Device)> {
        let g = GPU.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some((g, gpu_common::device()?))
    }

    fn fixture() -> PathBuf {
        std::env::var_os("BM_FIXTURE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a")).to_path_buf())
    }

    /// Tokens teacher-forced through the decoders (≥ 64 decode steps).
    const STEPS: usize = 72;

    /// A model of its own config, random perturbed weights from `seed`, in `dtype`.
    fn random(json: serde_json::Value, seed: u64, dtype: DType, dev: &Device) -> Model {
        let cfg = Config::from_json_str(&json.to_string()).unwrap();
        let w = random_weights(&cfg, RandomInit { seed, perturb: true }, dtype, dev).unwrap();
        Model::from_tensors(&cfg, w, dtype, dev).unwrap()
    }

    /// d 128, experts of 256 (every product's rows fit every format, q4g128 included).
    fn wide(dtype: DType, dev: &Device) -> Model {
        let json = serde_json::json!({
            "num_layers": 4, "hidden_size": 128, "state_size": 16, "conv_dimension": 4,
            "vocab_size": 320, "expansion_factor": 2, "mamba_moe_layers": ["r", "8", "r", "8"],
            "ffn_hidden_size": 256, "add_bias_linear": false, "swiglu": true, "max_sequence_length": 2048
        });
        random(json, 11, dtype, dev)
    }

    /// d 40, experts of 24, ungated: int8/fp8 rows of 40 and 24 codes (not 16-byte multiples)
    /// take the kernels' element-wise path, d_inner 80 the vector one.
    fn narrow(dtype: DType, dev: &Device) -> Model {
        let json = serde_json::json!({
            "num_layers": 4, "hidden_size": 40, "state_size": 8, "conv_dimension": 4,
            "vocab_size": 300, "expansion_factor": 2, "mamba_moe_layers": ["r", "8", "r", "8"],
            "ffn_hidden_size": 24, "add_bias_linear": false, "swiglu": false, "max_sequence_length": 2048
        });
        random(json, 12, dtype, dev)
    }

    /// The parts a format leaves unquantised on a model whose rows it cannot group.
    fn keep_for(format: QuantFormat, m: &Model) -> Vec<Part> {
        let Some(g) = format.group() else { return Vec::new() };
        let (d, di, f) = (m.cfg.hidden_size, m.cfg.d_inner(), m.cfg.ffn_hidden_size);
        let mut keep = Vec::new();
        if d % g != 0 {
            keep.extend([Part::InProj, Part::Fc1, Part::Embedding]);
        }
        if di % g != 0 {
            keep.extend([Part::XProj, Part::OutProj]);
        }
        if f % g != 0 {
            keep.push(Part::Fc2);
        }
        keep
    }

    /// `m` quantised (round-to-nearest at load) in `format`.
    fn quantized(m: &Model, format: QuantFormat) -> Model {
        let mut q = m.clone();
        let spec = QuantSpec::new(format, &keep_for(format, m), &[], false).unwrap();
        let sum = quantize_model(&mut q, &spec).unwrap();
        assert!(sum.linears > 0, "{format}: nothing quantised");
        q
    }

    /// `m16` (the same model in another dtype) given `q32`'s quantised matrices: the same codes
    /// and scales, the dense copies dequantised into m16's dtype.
    fn same_codes(q32: &Model, m16: &Model) -> Model {
        let mut src = q32.clone();
        let mut packed: HashMap<String, Arc<QLinear>> = HashMap::new();
        for_each_linear(&mut src, &mut |name, _, l| {
            if let Some(q) = &l.quant {
                packed.insert(name.to_string(), q.clone());
            }
            Ok(())
        })
        .unwrap();
        let mut out = m16.clone();
        for_each_linear(&mut out, &mut |name, _, l| {
            if let Some(q) = packed.get(name) {
                l.weight = q.dense(l.weight.dtype(), l.weight.device())?;
                l.quant = Some(q.clone());
            }
            Ok(())
        })
        .unwrap();
        if let Some(h) = &q32.head_quant {
            out.embedding = h.dense(out.embedding.dtype(), &out.device).unwrap();
            out.head_quant = Some(h.clone());
        }
        out
    }

    /// Logits of every position of `ids` and the experts chosen per MoE layer and step: the
    /// first token through `Model::forward`, the rest teacher-forced through a graph-captured
    /// decoder with the probe.
    fn decode(m: &Model, ids: &[u32], opts: DecodeOpts) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
        let dev = &m.device;
        let mut st = m.new_state(1).unwrap();
        let first = m
            .forward(&Tensor::from_slice(&ids[..1], (1, 1), dev).unwrap(), &mut st, Logits::Last, None)
            .unwrap();
        let mut dec = Decoder::new(m, DecodeOpts { probe: true, ..opts }).unwrap();
        dec.load_state(&st).unwrap();
        dec.capture().unwrap();
        let mut out = vec![gpu_common::host(&first)];
        let mut probe = Probe::new();
        for &id in &ids[1..] {
            dec.set_token(id).unwrap();
            dec.step().unwrap();
            dec.record_probe(0, &mut probe).unwrap();
            out.push(dec.logits().unwrap());
        }
        (out, probe.moe.into_iter().map(|r| r.experts).collect())
    }

    /// max |a − b| and max |b|.
    fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
        assert_eq!(a.len(), b.len());
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d.is_finite(), "non-finite logits");
        (d, b.iter().map(|x| x.abs()).fold(0f32, f32::max))
    }

    fn packed(on: bool, split_k: u32) -> DecodeOpts {
        DecodeOpts {
            packed: on,
            split_k,
            ..Default::default()
        }
    }

    /// f32: the packed decode against the dense twin, logits within 1e-4 of their scale at every
    /// step, the same expert at every MoE layer and step.
    fn f32_parity(what: &str, q: &Model, ids: &[u32], split_k: u32) {
        let (got, routes) = decode(q, ids, packed(true, split_k));
        let (want, twin_routes) = decode(q, ids, packed(false, split_k));
        assert_eq!(routes, twin_routes, "{what}: routes");
        let mut worst = 0f32;
        for (t, (g, w)) in got.iter().zip(&want).enumerate().skip(1) {
            let (d, s) = diff(g, w);
            worst = worst.max(d / s.max(1e-3));
            assert!(d <= 1e-4 * s.max(1e-3), "{what} step {t}: max |Δ| {d} (scale {s})");
        }
        eprintln!(
            "{what}: f32 packed vs dense twin, worst relative |Δ| {worst:.2e} over {} steps",
            ids.len() - 1
        );
    }

    /// bf16: the packed decode (`q16`) and the dense bf16 twin against the exact quantised model
    /// (`q32` on its dense f32 path), see the module docs.
    fn bf16_parity(what: &str, q32: &Model, q16: &Model, ids: &[u32]) {
        let (exact, r32) = decode(q32, ids, packed(false, 0));
        let (got, rq) = decode(q16, ids, packed(true, 0));
        let (twin, rt) = decode(q16, ids, packed(false, 0));
        let same = |t: usize| (0..r32.len()).all(|l| r32[l][t - 1] == rq[l][t - 1] && r32[l][t - 1] == rt[l][t - 1]);
        let (mut eq, mut et, mut eqt, mut s, mut count) = (0f32, 0f32, 0f32, 0f32, 0usize);
        let (mut top_q, mut top_t) = (0usize, 0usize);
        for t in 1..ids.len() {
            top_q += usize::from(argmax(&got[t]) == argmax(&exact[t]));
            top_t += usize::from(argmax(&twin[t]) == argmax(&exact[t]));
            if same(t) {
                let (a, sc) = diff(&got[t], &exact[t]);
                eq = eq.max(a);
                et = et.max(diff(&twin[t], &exact[t]).0);
                eqt = eqt.max(diff(&got[t], &twin[t]).0);
                s = s.max(sc);
                count += 1;
            }
        }
        let n = ids.len() - 1;
        eprintln!(
            "{what}: bf16 on {count}/{n} same-route steps: packed {eq:.3e}, dense twin {et:.3e} from the exact model, \
             packed vs twin {eqt:.3e} (scale {s:.3}); top-1 packed {top_q}/{n}, twin {top_t}/{n}"
        );
        assert!(count * 2 >= n, "{what}: only {count} of {n} steps route alike");
        assert!(
            eq <= 1.5 * et + 1e-3 * s,
            "{what}: packed bf16 error {eq}, dense twin's {et} (scale {s})"
        );
        assert!(
            eqt <= 3.0 * et + 1e-3 * s,
            "{what}: packed vs twin {eqt}, twin's own error {et} (scale {s})"
        );
        assert!(top_q + 2 >= top_t, "{what}: top-1 packed {top_q}/{n}, twin {top_t}/{n}");
    }

    #[test]
    fn packed_decode_matches_the_dense_twin_on_the_fixture() {
        let Some((_gpu, dev)) = gpu() else { return };
        let m32 = load_dir(&fixture(), &dev, DType::F32).unwrap().0;
        let m16 = load_dir(&fixture(), &dev, DType::BF16).unwrap().0;
        let vocab = m32.cfg.vocab_size;
        let ids = random_ids(STEPS + 1, vocab, 21);
        for format in FORMATS {
            let q32 = quantized(&m32, format);
            f32_parity(&format!("tiny-a {format}"), &q32, &ids, 0);
            bf16_parity(&format!("tiny-a {format}"), &q32, &same_codes(&q32, &m16), &ids);
        }
    }

    #[test]
    fn packed_decode_matches_the_dense_twin_on_a_random_model() {
        let Some((_gpu, dev)) = gpu() else { return };
        let (m32, m16) = (wide(DType::F32, &dev), wide(DType::BF16, &dev));
        let ids = random_ids(STEPS + 1, m32.cfg.vocab_size, 22);
        for format in FORMATS {
            let q32 = quantized(&m32, format);
            assert!(keep_for(format, &m32).is_empty());
            // split-K of the residual products: 2 slices (the default) and 3 (ragged: 96, 96, 64)
            for split_k in [0, 3] {
                f32_parity(&format!("random {format} split {split_k}"), &q32, &ids, split_k);
            }
            bf16_parity(&format!("random {format}"), &q32, &same_codes(&q32, &m16), &ids);
        }
    }

    #[test]
    fn packed_decode_takes_the_element_path_on_unaligned_rows() {
        let Some((_gpu, dev)) = gpu() else { return };
        let m32 = narrow(DType::F32, &dev);
        let ids = random_ids(STEPS + 1, m32.cfg.vocab_size, 23);
        for format in [QuantFormat::Int8, QuantFormat::Fp8] {
            f32_parity(&format!("narrow {format}"), &quantized(&m32, format), &ids, 0);
        }
    }

    /// (No GPU needed: the count reads the model's shapes.)
    #[test]
    fn bytes_per_token_counts_the_packed_weights() {
        let m = wide(DType::BF16, &Device::Cpu);
        let dense = Decoder::bytes_per_token(&m);
        assert_eq!(dense, Decoder::dense_bytes_per_token(&m));
        let (d, di, f, v) = (128usize, 256usize, 256usize, 320usize);
        let (r2, mamba, moe) = (8 + 32, 2, 2);
        // per token: in_proj, x_proj, out_proj of each Mamba layer, fc1 (gated) and fc2 of one
        // expert per MoE layer, the head (elements)
        let elems = mamba * (2 * di * d + r2 * di + d * di) + moe * (2 * f * d + d * f) + v * d;
        for format in FORMATS {
            let q = quantized(&m, format);
            let packed = Decoder::bytes_per_token(&q);
            assert_eq!(Decoder::dense_bytes_per_token(&q), dense, "{format}");
            let codes = elems * format.bits() / 8;
            let scales = match format.group() {
                None => 2 * (mamba * (2 * di + r2 + d) + moe * (2 * f + d) + v),
                Some(g) => 2 * elems / g,
            };
            // the embedding row: d codes and their scales
            let row = d * format.bits() / 8 + 2 * format.group().map_or(1, |g| d / g);
            assert_eq!(dense - packed, 2 * elems + 2 * d - codes - scales - row, "{format}");
        }
    }
}
