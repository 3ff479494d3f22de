//! Quantised checkpoints, written by `blackmamba quantize --out DIR` and read by the loader
//! (layout: `docs/quantization.md`). A folder with `quantization.json` beside `config.json` and
//! `model.safetensors`; each quantised matrix `P.weight` is stored as `P.qweight` (u8, rows ×
//! bytes per row) and `P.scales` (f16, rows × scales per row), every other tensor as it is.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};

use super::apply::{for_each_linear, QLinear, EMBEDDING};
use super::{QWeight, QuantFormat, QuantSpec};
use crate::error::{Error, Result};
use crate::model::weights::{save_safetensors, write_atomic};
use crate::model::Model;

/// The manifest's file name.
pub const MANIFEST: &str = "quantization.json";

/// `quantization.json`: the format and which tensors take it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// 1: the layout of this module's docs.
    pub version: u32,
    /// `int8`, `fp8`, `q4g64` or `q4g128`.
    pub format: String,
    pub bits: usize,
    /// Inputs per scale; `null` for one scale per output channel.
    pub group: Option<usize>,
    /// Always `f16`.
    pub scale_dtype: String,
    /// How codes sit in `qweight` (see `docs/quantization.md`).
    pub packing: String,
    /// Prefixes `P` stored as `P.qweight` + `P.scales` (the embedding is also the tied head).
    pub quantized: Vec<String>,
    /// Tensors stored dequantised after a quantise-dequantise in place (`--quant-also conv,...`).
    pub in_place: Vec<String>,
}

fn packing(format: QuantFormat) -> &'static str {
    match format {
        QuantFormat::Int8 => "int8: one i8 code per byte, row-major; w = scale[row] * q",
        QuantFormat::Fp8 => "fp8: one E4M3 (e4m3fn) code per byte, row-major; w = scale[row] * e4m3(code)",
        QuantFormat::Q4 { .. } => {
            "q4: two codes per byte, row-major, element 2k in the low nibble of byte k of its row and 2k+1 in the high nibble, each stored as q+8 (q in [-8, 7]); w = scale[row, col / group] * q"
        }
    }
}

/// The quantised matrices of a model by prefix (the embedding under [`EMBEDDING`]).
fn quantized_layers(model: &Model) -> Result<Vec<(String, Arc<QLinear>)>> {
    let mut out = Vec::new();
    let mut m = model.clone();
    for_each_linear(&mut m, &mut |name, _, l| {
        if let Some(q) = &l.quant {
            out.push((name.to_string(), q.clone()));
        }
        Ok(())
    })?;
    if let Some(q) = &model.head_quant {
        out.push((EMBEDDING.to_string(), q.clone()));
    }
    Ok(out)
}

/// Writes `model` (quantised by `spec`) with its tokenizer into `dir`: `model.safetensors`,
/// `tokenizer.json`, `config.json`, then `quantization.json`, each atomically.
pub fn save(model: &Model, tokenizer: &tokenizers::Tokenizer, spec: &QuantSpec, dir: &Path) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let layers = quantized_layers(model)?;
    let prefixes: HashSet<String> = layers.iter().map(|(p, _)| format!("{p}.weight")).collect();
    let mut map = HashMap::new();
    for (n, t) in model.named_tensors()? {
        if n.contains(".lora_") {
            return Err(Error::Invalid(format!(
                "{n}: merge the adapter before quantising (--adapter merges it at load)"
            )));
        }
        if !prefixes.contains(&n) {
            map.insert(n, t.to_device(&Device::Cpu)?);
        }
    }
    for (p, q) in &layers {
        let w = &q.weight;
        let bytes = QWeight::row_bytes(w.format, w.cols);
        map.insert(
            format!("{p}.qweight"),
            Tensor::from_vec(w.data.clone(), (w.rows, bytes), &Device::Cpu)?,
        );
        let per_row = w.scales.len() / w.rows;
        map.insert(
            format!("{p}.scales"),
            Tensor::from_vec(w.scales.clone(), (w.rows, per_row), &Device::Cpu)?,
        );
    }
    let manifest = Manifest {
        version: 1,
        format: spec.format.name(),
        bits: spec.format.bits(),
        group: spec.format.group(),
        scale_dtype: "f16".into(),
        packing: packing(spec.format).into(),
        quantized: layers.iter().map(|(p, _)| p.clone()).collect(),
        in_place: in_place_names(model, spec),
    };
    save_safetensors(&map, &dir.join("model.safetensors"))?;
    let tok = tokenizer
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("writing tokenizer.json: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
    write_atomic(&dir.join("config.json"), model.cfg.to_json_string()?.as_bytes())?;
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid(format!("{MANIFEST}: {e}")))?;
    write_atomic(&dir.join(MANIFEST), json.as_bytes())?;
    Ok(manifest)
}

fn in_place_names(model: &Model, spec: &QuantSpec) -> Vec<String> {
    use super::Part;
    let mut out = Vec::new();
    for (i, b) in model.layers.iter().enumerate() {
        if spec.has(Part::Norms) {
            out.push(format!("decoder.layers.{i}.norm.weight"));
        }
        if matches!(b.mixer, crate::model::Mixer::Mamba(_)) {
            for (part, n) in [(Part::Conv, "conv1d.weight"), (Part::ALog, "A_log"), (Part::D, "D")] {
                if spec.has(part) {
                    out.push(format!("decoder.layers.{i}.mixer.{n}"));
                }
            }
        }
    }
    if spec.has(Part::Norms) {
        out.extend([
            "decoder.final_layernorm.weight".to_string(),
            "decoder.final_layernorm.bias".to_string(),
        ]);
    }
    out
}

/// Reads `dir/quantization.json`, `None` where there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<(Manifest, QuantFormat)>> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("{e}; rewrite it with `blackmamba quantize`")))?;
    if m.version != 1 {
        return Err(Error::bad_file(
            &path,
            format!("version {} is not known to this build (1 is)", m.version),
        ));
    }
    let f: QuantFormat = m.format.parse().map_err(|e: Error| Error::bad_file(&path, e.to_string()))?;
    if m.bits != f.bits() || m.group != f.group() || m.scale_dtype != "f16" {
        return Err(Error::bad_file(
            &path,
            format!("bits, group or scale_dtype disagree with format {f}"),
        ));
    }
    Ok(Some((m, f)))
}

/// The header index of a quantised checkpoint as the dense one it stands for: each `P.qweight` /
/// `P.scales` pair becomes `P.weight` (rows, cols), so the usual shape checks apply.
pub fn dense_index(index: Vec<(String, Vec<usize>)>, m: &Manifest, f: QuantFormat) -> Vec<(String, Vec<usize>)> {
    let q: HashSet<&str> = m.quantized.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(index.len());
    for (n, shape) in index {
        match n.rsplit_once('.') {
            Some((p, "qweight")) if q.contains(p) => {
                let cols = shape.get(1).map_or(0, |&b| if f.bits() == 4 { b * 2 } else { b });
                out.push((format!("{p}.weight"), vec![shape.first().copied().unwrap_or(0), cols]));
            }
            Some((p, "scales")) if q.contains(p) => {}
            _ => out.push((n, shape)),
        }
    }
    out
}

/// Replaces each `P.qweight` / `P.scales` pair of `raw` by the dense `P.weight` (f32) and returns
/// the quantised matrices by prefix.
pub fn take_quantized(
    raw: &mut HashMap<String, Tensor>,
    m: &Manifest,
    f: QuantFormat,
    device: &Device,
) -> Result<HashMap<String, QWeight>> {
    let mut out = HashMap::new();
    for p in &m.quantized {
        let take = |raw: &mut HashMap<String, Tensor>, n: &str| {
            raw.remove(n).ok_or_else(|| Error::MissingTensor {
                name: n.to_string(),
                expected: vec![],
            })
        };
        let (qw, sc) = (take(raw, &format!("{p}.qweight"))?, take(raw, &format!("{p}.scales"))?);
        if qw.dtype() != DType::U8 || sc.dtype() != DType::F16 {
            return Err(Error::Invalid(format!(
                "{p}: qweight must be u8 and scales f16, found {:?} and {:?}",
                qw.dtype(),
                sc.dtype()
            )));
        }
        let (rows, bytes) = qw.dims2()?;
        let cols = if f.bits() == 4 { bytes * 2 } else { bytes };
        let data: Vec<u8> = qw.flatten_all()?.to_vec1()?;
        let scales: Vec<f16> = sc.flatten_all()?.to_vec1()?;
        let w = QWeight::from_parts(f, rows, cols, data, scales, &format!("{p}.qweight"))?;
        raw.insert(format!("{p}.weight"), Tensor::from_vec(w.dequantize(), (rows, cols), device)?);
        out.insert(p.clone(), w);
    }
    Ok(out)
}

/// Puts the quantised matrices of [`take_quantized`] onto the model built from the dense ones.
pub fn attach(model: &mut Model, mut q: HashMap<String, QWeight>, ggml: bool) -> Result<()> {
    for_each_linear(model, &mut |name, _, l| {
        if let Some(w) = q.remove(name) {
            l.quant = Some(Arc::new(QLinear::new(w, ggml)?));
        }
        Ok(())
    })?;
    if let Some(w) = q.remove(EMBEDDING) {
        model.head_quant = Some(Arc::new(QLinear::new(w, ggml)?));
    }
    match q.keys().next() {
        Some(p) => Err(Error::Invalid(format!(
            "{MANIFEST} lists {p}, which is no linear layer of this model"
        ))),
        None => Ok(()),
    }
}
