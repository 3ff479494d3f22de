//! A safe reader for torch zip checkpoints (`pytorch_model.bin`).
//!
//! The pickle inside is read by [`crate::model::pickle`], which only builds data. Everything the
//! file says about sizes is checked before it is used, because a checkpoint is untrusted input:
//!
//! * `data.pkl` may hold at most [`MAX_PICKLE_BYTES`];
//! * every zip entry's declared size must be possible: a stored entry's equals its stored bytes, a
//!   deflated one is at most [`MAX_DEFLATE_RATIO`] times its compressed bytes, and no entry claims
//!   more compressed bytes than the file holds; reading stops at the declared size, and the CRC of
//!   every entry is checked;
//! * offsets, shapes and strides are multiplied with checked arithmetic, and every tensor must fit
//!   in its storage entry (without overlapping views), all before any tensor data is read.
//!
//! So a corrupt, truncated or hostile file is a one-line error naming the file, never a panic, an
//! abort or a huge allocation.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, Result};
use crate::model::pickle::{unpickle, Id, Limits, Obj, Pickle};

/// The largest `data.pkl` read (a 2.8B-parameter state dict's is about 100 kB).
pub const MAX_PICKLE_BYTES: u64 = 32 << 20;

/// The most bytes deflate can produce from one compressed byte (zlib's bound is 1032:1).
pub const MAX_DEFLATE_RATIO: u64 = 1032;

/// Where one tensor's bytes are and how to view them.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    /// In elements, from the start of the storage.
    pub offset: usize,
    /// The storage key: data lives in `<archive>/data/<key>`.
    pub key: String,
}

impl TensorInfo {
    /// Elements of the tensor; `None` when the shape's product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// Bytes of the tensor once read; `None` on overflow.
    pub fn nbytes(&self) -> Option<usize> {
        self.numel()?.checked_mul(self.dtype.size_in_bytes())
    }

    /// Elements of storage the tensor reaches, from its first to its last (`None` on overflow).
    fn span(&self) -> Option<usize> {
        if self.numel()? == 0 {
            return Some(0);
        }
        self.shape
            .iter()
            .zip(&self.stride)
            .try_fold(1usize, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)))
    }

    /// Bytes of storage the tensor needs: `(offset + span) * element size` (`None` on overflow).
    pub fn storage_bytes_needed(&self) -> Option<usize> {
        self.offset.checked_add(self.span()?)?.checked_mul(self.dtype.size_in_bytes())
    }
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "BFloat16Storage" => DType::BF16,
        "HalfStorage" => DType::F16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "ByteStorage" | "BoolStorage" => DType::U8,
        _ => return None,
    })
}

fn usizes(p: &Pickle, id: Id) -> Option<Vec<usize>> {
    match p.get(id)? {
        Obj::Tuple(v) | Obj::List(v) => v
            .iter()
            .map(|&x| {
                if let Some(Obj::Int(i)) = p.get(x) {
                    usize::try_from(*i).ok()
                } else {
                    None
                }
            })
            .collect(),
        _ => None,
    }
}

fn tensor_info(p: &Pickle, value: Id) -> std::result::Result<TensorInfo, String> {
    let Some(&Obj::Call(mut f, mut args)) = p.get(value) else {
        return Err("is not a tensor".into());
    };
    if let (Some(Obj::Global(_, n)), Some(Obj::Tuple(a))) = (p.get(f), p.get(args)) {
        if n == "_rebuild_parameter" {
            match a.first().and_then(|&t| p.get(t)) {
                Some(&Obj::Call(f2, a2)) => (f, args) = (f2, a2),
                _ => return Err("is a parameter without a tensor".into()),
            }
        }
    }
    if !matches!(p.get(f), Some(Obj::Global(_, n)) if n == "_rebuild_tensor_v2") {
        return Err("is not a tensor".into());
    }
    let Some(Obj::Tuple(a)) = p.get(args) else {
        return Err("has malformed tensor arguments".into());
    };
    if a.len() < 4 {
        return Err("has too few tensor arguments".into());
    }
    let Some(Obj::PersId(pid)) = p.get(a[0]) else {
        return Err("has no storage reference".into());
    };
    let Some(Obj::Tuple(r)) = p.get(*pid) else {
        return Err("has a malformed storage reference".into());
    };
    let (class, key) = match (r.get(1).and_then(|&i| p.get(i)), r.get(2).and_then(|&i| p.get(i))) {
        (Some(Obj::Global(_, c)), Some(Obj::Str(k))) => (c.clone(), k.clone()),
        _ => return Err("has a malformed storage reference".into()),
    };
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(format!("names a storage outside the archive: '{key}'"));
    }
    if class == "IntStorage" {
        return Err("has int32 storage, which weights never use".into());
    }
    let dtype = storage_dtype(&class).ok_or_else(|| format!("has unsupported storage '{class}'"))?;
    let offset = match p.get(a[1]) {
        Some(Obj::Int(o)) => usize::try_from(*o).map_err(|_| format!("has a negative storage offset ({o})"))?,
        _ => return Err("has a malformed offset".into()),
    };
    let shape = usizes(p, a[2]).ok_or("has a malformed shape")?;
    let stride = usizes(p, a[3]).ok_or("has a malformed stride")?;
    if shape.len() != stride.len() {
        return Err("has shape and stride of different ranks".into());
    }
    let info = TensorInfo {
        dtype,
        shape,
        stride,
        offset,
        key,
    };
    if info.nbytes().is_none() || info.storage_bytes_needed().is_none() {
        return Err(format!(
            "has a shape {:?} (stride {:?}, offset {}) whose size overflows: the file is corrupt or hostile",
            info.shape, info.stride, info.offset
        ));
    }
    Ok(info)
}

/// Unpickles a torch `data.pkl` and lists its tensors (name, where its data is), in file order;
/// `key` selects a top-level entry (`{"model": state_dict}`). The entry point of the unpickler for
/// the loader, the fuzz target and tests.
pub fn parse_pickle(data: &[u8], key: Option<&str>) -> std::result::Result<Vec<(String, TensorInfo)>, String> {
    let p = unpickle(data, Limits::for_len(data.len()))?;
    let mut dict = p.root;
    if let Some(k) = key {
        let Some(Obj::Dict(items)) = p.get(dict) else {
            return Err(format!("the top level is not a dictionary (expected {{\"{k}\": state_dict}})"));
        };
        dict = items
            .iter()
            .find(|(n, _)| matches!(p.get(*n), Some(Obj::Str(s)) if s == k))
            .map(|&(_, v)| v)
            .ok_or_else(|| format!("no '{k}' entry at the top level (expected {{\"{k}\": state_dict}})"))?;
    }
    let Some(Obj::Dict(items)) = p.get(dict) else {
        return Err("the state dict is not a dictionary".into());
    };
    let mut entries = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for &(name, value) in items {
        let Some(Obj::Str(name)) = p.get(name) else { continue };
        let info = tensor_info(&p, value).map_err(|m| format!("entry '{name}' {m}"))?;
        if !seen.insert(name.as_str()) {
            return Err(format!("tensor '{name}' appears twice in the state dict (corrupt file?)"));
        }
        entries.push((name.clone(), info));
    }
    Ok(entries)
}

/// The tensors of a torch zip checkpoint, known from its pickle before any data is read.
#[derive(Debug, Clone)]
pub struct PthIndex {
    pub path: PathBuf,
    prefix: String,
    file_len: u64,
    /// (name, where its data is), in file order
    pub entries: Vec<(String, TensorInfo)>,
}

/// The reader of a checkpoint's zip archive.
pub type PthZip = zip::ZipArchive<std::io::BufReader<std::fs::File>>;

impl PthIndex {
    /// Reads the pickle of `path`, indexes the state dict under `key` (e.g. `"model"`) and checks
    /// that every tensor fits in its storage entry; reads no tensor data.
    pub fn open(path: &Path, key: Option<&str>) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(path, msg);
        let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        let mut zip = open_zip(path)?;
        let pkl_name = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i).and_then(|r| r.ok()).map(|s| s.to_string()))
            .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
            .ok_or_else(|| bad("no data.pkl inside: not a torch checkpoint".into()))?;
        let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
        let pkl = read_entry(&mut zip, &pkl_name, file_len, MAX_PICKLE_BYTES).map_err(bad)?;
        let entries = parse_pickle(&pkl, key).map_err(bad)?;
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        for (name, info) in &entries {
            let size = match sizes.get(info.key.as_str()) {
                Some(&s) => s,
                None => {
                    let s = entry_meta(&mut zip, &format!("{prefix}data/{}", info.key), file_len)
                        .map_err(|m| bad(format!("tensor '{name}': {m}")))?
                        .0;
                    sizes.insert(&info.key, s);
                    s
                }
            };
            check_fits(info, size).map_err(|m| bad(format!("tensor '{name}': {m}")))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            prefix,
            file_len,
            entries,
        })
    }

    /// Reads every tensor onto `device`, calling `each(done, total)` after each one.
    pub fn read_all(&self, device: &Device, each: &mut dyn FnMut(usize, usize)) -> Result<HashMap<String, Tensor>> {
        let mut zip = open_zip(&self.path)?;
        let mut out = HashMap::with_capacity(self.entries.len());
        for (i, (name, info)) in self.entries.iter().enumerate() {
            let t = self.read_one(&mut zip, info).map_err(|e| match e {
                Error::BadFile { path, msg } => Error::bad_file(path, format!("tensor '{name}': {msg}")),
                other => other,
            })?;
            out.insert(name.clone(), t.to_device(device)?);
            each(i + 1, self.entries.len());
        }
        Ok(out)
    }

    /// Reads one tensor (on the CPU).
    pub fn read_one(&self, zip: &mut PthZip, info: &TensorInfo) -> Result<Tensor> {
        read_tensor(zip, &self.prefix, info, self.file_len).map_err(|m| Error::bad_file(&self.path, m))
    }
}

/// Opens the zip archive of a torch checkpoint.
pub fn open_zip(path: &Path) -> Result<PthZip> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::bad_file(path, format!("not a torch zip checkpoint or truncated ({e}); re-download it")))
}

/// Reads the state dict of a torch zip checkpoint (under `key`, e.g. `"model"`) onto `device`.
pub fn read_state_dict(path: &Path, key: Option<&str>, device: &Device) -> Result<HashMap<String, Tensor>> {
    PthIndex::open(path, key)?.read_all(device, &mut |_, _| {})
}

/// The declared size and CRC of a zip entry, after checking the size is one the entry can have.
fn entry_meta(zip: &mut PthZip, name: &str, file_len: u64) -> std::result::Result<(u64, u32), String> {
    let f = zip
        .by_name(name)
        .map_err(|e| format!("storage '{name}' missing ({e}); the file is corrupt or truncated"))?;
    let (size, packed) = (f.size(), f.compressed_size());
    if packed > file_len {
        return Err(format!(
            "entry '{name}' claims {packed} compressed bytes but the file has {file_len} (truncated?)"
        ));
    }
    match f.compression() {
        zip::CompressionMethod::Stored if size != packed => Err(format!(
            "stored entry '{name}' declares {size} bytes but holds {packed}: the file is corrupt or hostile"
        )),
        zip::CompressionMethod::Stored => Ok((size, f.crc32())),
        zip::CompressionMethod::Deflated if size > packed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024) => Err(format!(
            "entry '{name}' declares {size} bytes from {packed} compressed bytes, more than deflate can produce: the file is corrupt or hostile"
        )),
        zip::CompressionMethod::Deflated => Ok((size, f.crc32())),
        other => Err(format!("entry '{name}' uses compression {other}, which torch never writes")),
    }
}

/// Reads a whole zip entry of at most `max` bytes: never past its declared size, CRC checked.
fn read_entry(zip: &mut PthZip, name: &str, file_len: u64, max: u64) -> std::result::Result<Vec<u8>, String> {
    let (size, crc) = entry_meta(zip, name, file_len)?;
    if size > max {
        return Err(format!(
            "entry '{name}' declares {size} bytes, more than the {max} a checkpoint's {} may have (hostile file?)",
            name.rsplit('/').next().unwrap_or(name)
        ));
    }
    let cap = usize::try_from(size).map_err(|_| format!("entry '{name}' is too large for this machine"))?;
    let mut f = zip.by_name(name).map_err(|e| format!("entry '{name}' missing ({e})"))?;
    let mut buf = Vec::with_capacity(cap);
    (&mut f)
        .take(size.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read '{name}' ({e}); the file is corrupt or truncated: re-download it"))?;
    if buf.len() != cap {
        return Err(format!(
            "entry '{name}' inflates to {}{} bytes but declares {size}: the file is corrupt or hostile",
            buf.len(),
            if buf.len() > cap { "+" } else { "" }
        ));
    }
    if crc32fast::hash(&buf) != crc {
        return Err(format!("entry '{name}' fails its CRC check: the file is corrupt; re-download it"));
    }
    Ok(buf)
}

/// Checks that a tensor lies inside a storage of `size` bytes and does not view more bytes than
/// the storage holds (overlapping strides, which weights never use).
fn check_fits(info: &TensorInfo, size: u64) -> std::result::Result<(), String> {
    let overflow = || format!("shape {:?} with offset {} overflows", info.shape, info.offset);
    let need = info.storage_bytes_needed().ok_or_else(overflow)?;
    let nbytes = info.nbytes().ok_or_else(overflow)?;
    if need as u64 > size {
        return Err(format!(
            "needs {need} bytes of storage '{}' (shape {:?}, offset {}) but it holds {size} (truncated or corrupt file)",
            info.key, info.shape, info.offset
        ));
    }
    if nbytes as u64 > size {
        return Err(format!(
            "views {nbytes} bytes of a {size}-byte storage (overlapping strides {:?}); weights never do this",
            info.stride
        ));
    }
    Ok(())
}

fn read_tensor(zip: &mut PthZip, prefix: &str, info: &TensorInfo, file_len: u64) -> std::result::Result<Tensor, String> {
    let entry = format!("{prefix}data/{}", info.key);
    let (size, _) = entry_meta(zip, &entry, file_len)?;
    check_fits(info, size)?;
    let bytes = read_entry(zip, &entry, file_len, size)?;
    let esize = info.dtype.size_in_bytes();
    let numel = info.numel().ok_or("shape overflows")?;
    let span = info.span().ok_or("shape overflows")?;
    let start = info.offset.checked_mul(esize).ok_or("offset overflows")?;
    let end = info.storage_bytes_needed().ok_or("offset overflows")?;
    let flat = Tensor::from_raw_buffer(&bytes[start..end], info.dtype, &[span], &Device::Cpu).map_err(|e| e.to_string())?;
    let mut contiguous = vec![1usize; info.shape.len()];
    for i in (0..info.shape.len().saturating_sub(1)).rev() {
        // no overflow: the product of the shape was checked above
        contiguous[i] = contiguous[i + 1] * info.shape[i + 1];
    }
    if numel == 0 || info.stride == contiguous {
        return flat
            .narrow(0, 0, numel)
            .and_then(|t| t.reshape(Shape::from(info.shape.clone())))
            .map_err(|e| e.to_string());
    }
    // General strides: gather the elements through an index tensor (every index < span, checked).
    let mut idx = Vec::with_capacity(numel);
    let mut pos = vec![0usize; info.shape.len()];
    for _ in 0..numel {
        let at: usize = pos.iter().zip(&info.stride).map(|(p, s)| p * s).sum();
        idx.push(u32::try_from(at).map_err(|_| "tensor too large for a strided read")?);
        for d in (0..pos.len()).rev() {
            pos[d] += 1;
            if pos[d] < info.shape[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let idx = Tensor::from_vec(idx, numel, &Device::Cpu).map_err(|e| e.to_string())?;
    flat.index_select(&idx, 0)
        .and_then(|t| t.reshape(Shape::from(info.shape.clone())))
        .map_err(|e| e.to_string())
}

/// Writes a state dict as a torch zip checkpoint `{"model": OrderedDict}` (f32/bf16/f16/i64),
/// in the same layout `torch.save` produces; used by tests and by conversions.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    crate::model::pth_write::write(path, tensors)
}
