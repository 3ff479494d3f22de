//! One-time conversion of a `pytorch_model.bin` into `model.safetensors` beside it, so later loads
//! memory-map the weights instead of unpacking a 5.6 GB pickle archive.
//!
//! The conversion streams one tensor at a time (memory stays at the largest tensor), is written to
//! a temp file and renamed, and records which source it came from in
//! `model.safetensors.source.json`. The fingerprint of the source is the hub blob name (the
//! sha256 of the file, which the hub cache uses as the blob's name) when the file is a link into
//! the cache's `blobs/`, else its size and modification time. A missing or different marker means
//! the conversion is redone.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::pth::{open_zip, PthIndex};
use crate::model::pth_write::tensor_bytes;
use crate::model::weights::{tmp_path, write_atomic};

/// The file name of the marker beside the converted weights.
pub const MARKER: &str = "model.safetensors.source.json";

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Marker {
    source: String,
    fingerprint: String,
}

/// The fingerprint of a source file (see the module docs).
pub fn fingerprint(path: &Path) -> Result<String> {
    if let Ok(target) = std::fs::read_link(path) {
        if target.components().any(|c| c.as_os_str() == "blobs") {
            if let Some(name) = target.file_name() {
                return Ok(format!("blob:{}", name.to_string_lossy()));
            }
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("size:{}:mtime:{mtime}", meta.len()))
}

/// What [`ensure_safetensors`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// A matching conversion was already there.
    Reused,
    /// The pickle was converted now.
    Converted,
}

/// Makes sure `dir/model.safetensors` is a conversion of `dir/pytorch_model.bin`.
/// `progress(done, total)` counts tensors while converting.
pub fn ensure_safetensors(dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<(PathBuf, Conversion)> {
    let src = dir.join("pytorch_model.bin");
    let dst = dir.join("model.safetensors");
    let marker_path = dir.join(MARKER);
    let want = Marker {
        source: "pytorch_model.bin".into(),
        fingerprint: fingerprint(&src)?,
    };
    let have: Option<Marker> = std::fs::read_to_string(&marker_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if dst.is_file() && have.as_ref() == Some(&want) {
        return Ok((dst, Conversion::Reused));
    }
    // Drop a stale marker first: a crash mid-way must not leave a marker that matches.
    let _ = std::fs::remove_file(&marker_path);
    convert(&src, &dst, progress)?;
    let text = serde_json::to_string_pretty(&want).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&marker_path, text.as_bytes())?;
    Ok((dst, Conversion::Converted))
}

fn dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U8 => "U8",
        other => return Err(Error::Invalid(format!("cannot convert {other:?} tensors"))),
    })
}

/// Streams every tensor of the pickle at `src` into a safetensors file at `dst` (atomically).
pub fn convert(src: &Path, dst: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let index = PthIndex::open(src, Some("model"))?;
    let mut entries = index.entries.clone();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    // header: name -> dtype, shape, byte range in the data section
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    meta.insert("converted_from".into(), "pytorch_model.bin".into());
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut off = 0usize;
    for (name, info) in &entries {
        let n = info.shape.iter().product::<usize>() * info.dtype.size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype_name(info.dtype)?, "shape": info.shape, "data_offsets": [off, off + n] }),
        );
        off += n;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = tmp_path(dst);
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let mut out = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).map_err(io)?);
    out.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&head).map_err(io)?;
    let mut zip = open_zip(src)?;
    let total = entries.len();
    for (i, (_, info)) in entries.iter().enumerate() {
        let t = index.read_one(&mut zip, info)?;
        out.write_all(&tensor_bytes(&t.flatten_all()?)?).map_err(io)?;
        progress(i + 1, total);
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
}
