//! One-time conversion of a `pytorch_model.bin` into safetensors, kept in this program's own
//! cache, so later loads memory-map the weights instead of unpacking a 5.6 GB pickle archive.
//!
//! The cache (by default `$XDG_CACHE_HOME/blackmamba`, else `~/.cache/blackmamba`; the edge picks
//! it, see [`crate::hub::HubEnv`]) holds `conversions/<sha256>/model.safetensors` and a
//! `source.json` marker, keyed by the sha256 of the source file. Nothing is ever written beside the
//! source, so a read-only hub cache (shared clusters, containers) works, the hub cache's own
//! listing stays true, and two snapshots of the same blob share one conversion.
//!
//! The sha256 of a hub file is its blob's name (the hub cache names large files by it), so finding
//! a conversion reads no weights. For any other file it is computed once and remembered in
//! `hashes/` under the file's path, size and modification time.
//!
//! The conversion streams one tensor at a time (memory stays at the largest tensor), is written to
//! a temp file and renamed, and the marker is written last: an interrupted conversion is redone.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::DType;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::fsutil::{tmp_path, write_atomic};
use crate::model::pth::{open_zip, PthIndex};
use crate::model::pth_write::tensor_bytes;

/// The marker an earlier version of this program wrote beside a conversion *inside* the model
/// folder; still read, so that such a stale `model.safetensors` is never loaded.
pub const MARKER: &str = "model.safetensors.source.json";

/// The marker beside each conversion in the cache.
const CACHE_MARKER: &str = "source.json";

/// Bumped when the conversion's output changes, so old conversions are redone.
const FORMAT: u32 = 1;

/// What [`ConversionCache::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// A matching conversion was already there.
    Reused,
    /// The pickle was converted now.
    Converted,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct CacheMarker {
    format: u32,
    sha256: String,
    /// Where the source was when it was converted (for people reading the cache).
    source: String,
    /// The size of the converted file.
    bytes: u64,
}

/// The folder of conversions (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionCache {
    root: PathBuf,
}

impl ConversionCache {
    /// A cache in `root` (created on the first conversion).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether an error is about the cache (cannot create or write it) rather than the source.
    pub fn is_cache_error(&self, e: &Error) -> bool {
        match e {
            Error::Io { path, .. } | Error::BadFile { path, .. } => path.starts_with(&self.root),
            _ => false,
        }
    }

    fn dir_of(&self, sha: &str) -> PathBuf {
        self.root.join("conversions").join(sha)
    }

    /// The finished conversion of `src`, if the cache has one; hashes nothing (a source whose
    /// hash is neither its blob name nor remembered counts as not converted).
    pub fn lookup(&self, src: &Path) -> Option<PathBuf> {
        let sha = blob_sha256(src).or_else(|| self.remembered_hash(src))?;
        self.finished(&sha)
    }

    fn finished(&self, sha: &str) -> Option<PathBuf> {
        let dir = self.dir_of(sha);
        let marker: CacheMarker = serde_json::from_str(&std::fs::read_to_string(dir.join(CACHE_MARKER)).ok()?).ok()?;
        let st = dir.join("model.safetensors");
        let len = std::fs::metadata(&st).ok()?.len();
        (marker.format == FORMAT && marker.sha256 == sha && marker.bytes == len).then_some(st)
    }

    /// The sha256 of `src`: its blob name, the remembered hash, or computed now and remembered.
    pub fn source_hash(&self, src: &Path) -> Result<String> {
        if let Some(h) = blob_sha256(src).or_else(|| self.remembered_hash(src)) {
            return Ok(h);
        }
        let mut f = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(src, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = format!("{:x}", hasher.finalize());
        // remembering is an optimisation: a cache we cannot write only costs a re-hash next time
        if let Some(p) = self.hash_memo_path(src) {
            let _ = std::fs::create_dir_all(self.root.join("hashes"));
            let _ = write_atomic(&p, h.as_bytes());
        }
        Ok(h)
    }

    /// `hashes/<sha256 of path, size, mtime>`: a file whose path, size or modification time
    /// changed is hashed again.
    fn hash_memo_path(&self, src: &Path) -> Option<PathBuf> {
        let meta = std::fs::metadata(src).ok()?;
        let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        let canon = std::fs::canonicalize(src).ok()?;
        let key = sha2::Sha256::digest(format!("{}\n{}\n{mtime}", canon.display(), meta.len()).as_bytes());
        Some(self.root.join("hashes").join(format!("{key:x}")))
    }

    fn remembered_hash(&self, src: &Path) -> Option<String> {
        let h = std::fs::read_to_string(self.hash_memo_path(src)?).ok()?;
        is_sha256(h.trim()).then(|| h.trim().to_string())
    }

    /// Makes sure the cache holds a conversion of `src`; returns its path. `progress(done, total)`
    /// counts tensors while converting. An error that [`Self::is_cache_error`] names the cache
    /// (not writable, disk full); any other names the source.
    pub fn ensure(&self, src: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<(PathBuf, Conversion)> {
        let sha = self.source_hash(src)?;
        if let Some(st) = self.finished(&sha) {
            return Ok((st, Conversion::Reused));
        }
        let dir = self.dir_of(&sha);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let marker_path = dir.join(CACHE_MARKER);
        // Drop a stale marker first: a crash mid-way must not leave a marker that matches.
        let _ = std::fs::remove_file(&marker_path);
        let dst = dir.join("model.safetensors");
        convert(src, &dst, progress)?;
        let bytes = std::fs::metadata(&dst).map_err(|e| Error::io(&dst, e))?.len();
        let marker = CacheMarker {
            format: FORMAT,
            sha256: sha,
            source: src.display().to_string(),
            bytes,
        };
        let text = serde_json::to_string_pretty(&marker).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&marker_path, text.as_bytes())?;
        Ok((dst, Conversion::Converted))
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The sha256 a hub cache names a large file's blob by, when `path` links into `blobs/`.
fn blob_sha256(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    if !target.components().any(|c| c.as_os_str() == "blobs") {
        return None;
    }
    let name = target.file_name()?.to_str()?;
    is_sha256(name).then(|| name.to_ascii_lowercase())
}

#[derive(Debug, serde::Deserialize)]
struct LegacyMarker {
    fingerprint: String,
}

/// Whether `dir/model.safetensors` is an earlier version's conversion of `dir/pytorch_model.bin`
/// whose source has changed since (its marker's fingerprint no longer matches).
pub fn legacy_conversion_is_stale(dir: &Path) -> bool {
    let Some(marker) = std::fs::read_to_string(dir.join(MARKER))
        .ok()
        .and_then(|t| serde_json::from_str::<LegacyMarker>(&t).ok())
    else {
        return false;
    };
    legacy_fingerprint(&dir.join("pytorch_model.bin")).is_none_or(|f| f != marker.fingerprint)
}

/// The earlier versions' fingerprint: `blob:NAME` for a link into `blobs/`, else size and mtime.
fn legacy_fingerprint(path: &Path) -> Option<String> {
    if let Ok(target) = std::fs::read_link(path) {
        if target.components().any(|c| c.as_os_str() == "blobs") {
            return Some(format!("blob:{}", target.file_name()?.to_string_lossy()));
        }
    }
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(format!("size:{}:mtime:{mtime}", meta.len()))
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

/// Streams every tensor of the pickle at `src` into a safetensors file at `dst` (atomically; a
/// failed conversion leaves nothing behind).
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
        let end = info
            .nbytes()
            .and_then(|n| off.checked_add(n))
            .ok_or_else(|| Error::bad_file(src, format!("tensor '{name}': size overflows")))?;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype_name(info.dtype)?, "shape": info.shape, "data_offsets": [off, end] }),
        );
        off = end;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = tmp_path(dst);
    let written = (|| {
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
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
