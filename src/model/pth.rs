//! A safe reader for torch zip checkpoints (`pytorch_model.bin`).
//!
//! The pickle inside is interpreted by a small stack machine of our own that only builds data:
//! nothing from a checkpoint is ever executed, and every global it names must be one a tensor
//! state dict needs (tensor rebuild, typed storages, `OrderedDict`); any other global is refused
//! with an error naming it. Lengths are checked against the bytes that remain, so a corrupt or
//! truncated file is an error, never a panic or a huge allocation.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, Result};

/// Globals a torch state dict may name, and nothing else.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "HalfStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// A pickled value. Calls are kept as data (`Call`), never performed.
#[derive(Debug, Clone, PartialEq)]
enum Obj {
    Global(String, String),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Bool(bool),
    None,
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    Dict(Vec<(Obj, Obj)>),
    Call(Box<Obj>, Box<Obj>),
    PersId(Box<Obj>),
    Mark,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("the pickle ends early (truncated file?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("the pickle ends inside a global name")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> PResult<Obj> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow (corrupt file?)".to_string())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Obj>> {
        let at = self
            .stack
            .iter()
            .rposition(|o| *o == Obj::Mark)
            .ok_or("pickle mark missing (corrupt file?)")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> PResult<&mut Obj> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow (corrupt file?)".to_string())
    }
    fn global(&mut self, module: String, name: String) -> PResult<()> {
        if !ALLOWED_GLOBALS.iter().any(|(m, n)| *m == module && *n == name) {
            return Err(format!(
                "refusing pickle global '{module}.{name}': a weights file may only name tensor, storage and OrderedDict globals (nothing from a checkpoint is executed)"
            ));
        }
        self.stack.push(Obj::Global(module, name));
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Obj>) -> PResult<()> {
        if items.len() % 2 != 0 {
            return Err("odd number of dict items (corrupt file?)".into());
        }
        match self.top()? {
            Obj::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            _ => Err("dict items set on a non-dict (corrupt file?)".into()),
        }
    }

    /// Runs to STOP and returns the top of the stack.
    fn run(mut self) -> PResult<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    self.global(m, n)?;
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    match (m, n) {
                        (Obj::Str(m), Obj::Str(n)) => self.global(m, n)?,
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| format!("pickle memo {k} missing (corrupt file?)"))?;
                    self.stack.push(v);
                }
                b'(' => self.stack.push(Obj::Mark),
                b')' => self.stack.push(Obj::Tuple(vec![])),
                b'}' => self.stack.push(Obj::Dict(vec![])),
                b']' => self.stack.push(Obj::List(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Dict(vec![]));
                    self.set_items(items)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("pickle stack underflow (corrupt file?)".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Obj::Tuple(items));
                }
                b'X' | 0x8c | b'B' | b'C' => {
                    let n = match op {
                        b'X' | b'B' => self.u32()? as usize,
                        _ => usize::from(self.u8()?),
                    };
                    let bytes = self.take(n)?;
                    if op == b'X' || op == 0x8c {
                        let s = std::str::from_utf8(bytes).map_err(|_| "a pickle string is not UTF-8 (corrupt file?)")?;
                        self.stack.push(Obj::Str(s.to_string()));
                    } else {
                        self.stack.push(Obj::Bytes(bytes.to_vec()));
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Obj::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Obj::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Obj::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err("integer too large in pickle".into());
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // two's complement sign
                    }
                    self.stack.push(Obj::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Obj::Float(f64::from_be_bytes(a)));
                }
                0x88 => self.stack.push(Obj::Bool(true)),
                0x89 => self.stack.push(Obj::Bool(false)),
                b'N' => self.stack.push(Obj::None),
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    // OrderedDict() is the one call we "perform": it is an empty dict.
                    if f == Obj::Global("collections".into(), "OrderedDict".into()) {
                        self.stack.push(Obj::Dict(vec![]));
                    } else {
                        self.stack.push(Obj::Call(Box::new(f), Box::new(args)));
                    }
                }
                b'b' => {
                    // BUILD: state for an object; for our data it only ever fills a dict.
                    let state = self.pop()?;
                    if let (Obj::Dict(items), Ok(Obj::Dict(d))) = (state, self.top()) {
                        d.extend(items);
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(Obj::PersId(Box::new(id)));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.top()? {
                        Obj::List(l) => l.extend(items),
                        _ => return Err("append to a non-list (corrupt file?)".into()),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'.' => return self.pop(),
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} (not a torch weights file?)")),
            }
        }
    }
}

/// Where one tensor's bytes are and how to view them.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    pub offset: usize,
    /// The storage key: data lives in `<archive>/data/<key>`.
    pub key: String,
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "BFloat16Storage" => DType::BF16,
        "HalfStorage" => DType::F16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I64, // widened below
        "ByteStorage" | "BoolStorage" => DType::U8,
        _ => return None,
    })
}

fn usizes(o: &Obj) -> Option<Vec<usize>> {
    match o {
        Obj::Tuple(v) | Obj::List(v) => v
            .iter()
            .map(|x| if let Obj::Int(i) = x { usize::try_from(*i).ok() } else { None })
            .collect(),
        _ => None,
    }
}

fn tensor_info(value: &Obj) -> std::result::Result<TensorInfo, String> {
    let Obj::Call(f, args) = value else {
        return Err("is not a tensor".into());
    };
    let (f, args) = match (&**f, &**args) {
        (Obj::Global(_, n), Obj::Tuple(a)) if n == "_rebuild_parameter" => match a.first() {
            Some(Obj::Call(f2, a2)) => (&**f2, &**a2),
            _ => return Err("is a parameter without a tensor".into()),
        },
        (f, a) => (f, a),
    };
    if !matches!(f, Obj::Global(_, n) if n == "_rebuild_tensor_v2") {
        return Err("is not a tensor".into());
    }
    let Obj::Tuple(a) = args else {
        return Err("has malformed tensor arguments".into());
    };
    if a.len() < 4 {
        return Err("has too few tensor arguments".into());
    }
    let Obj::PersId(pid) = &a[0] else {
        return Err("has no storage reference".into());
    };
    let Obj::Tuple(p) = &**pid else {
        return Err("has a malformed storage reference".into());
    };
    let (class, key) = match (p.get(1), p.get(2)) {
        (Some(Obj::Global(_, c)), Some(Obj::Str(k))) => (c.clone(), k.clone()),
        _ => return Err("has a malformed storage reference".into()),
    };
    if key.contains('/') || key.contains("..") {
        return Err(format!("names a storage outside the archive: '{key}'"));
    }
    let dtype = storage_dtype(&class).ok_or_else(|| format!("has unsupported storage '{class}'"))?;
    let offset = match &a[1] {
        Obj::Int(o) => usize::try_from(*o).map_err(|_| "has a negative offset")?,
        _ => return Err("has a malformed offset".into()),
    };
    let shape = usizes(&a[2]).ok_or("has a malformed shape")?;
    let stride = usizes(&a[3]).ok_or("has a malformed stride")?;
    if shape.len() != stride.len() {
        return Err("has shape and stride of different ranks".into());
    }
    if class == "IntStorage" {
        return Err("has int32 storage, which weights never use".into());
    }
    Ok(TensorInfo {
        dtype,
        shape,
        stride,
        offset,
        key,
    })
}

/// The tensors of a torch zip checkpoint, known from its pickle before any data is read.
#[derive(Debug, Clone)]
pub struct PthIndex {
    pub path: std::path::PathBuf,
    prefix: String,
    /// (name, where its data is), in file order
    pub entries: Vec<(String, TensorInfo)>,
}

impl PthIndex {
    /// Reads the pickle of `path` and indexes the state dict under `key` (e.g. `"model"`).
    pub fn open(path: &Path, key: Option<&str>) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(path, msg);
        let mut zip = open_zip(path)?;
        let pkl_name = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i).and_then(|r| r.ok()).map(|s| s.to_string()))
            .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
            .ok_or_else(|| bad("no data.pkl inside: not a torch checkpoint".into()))?;
        let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
        let mut pkl = Vec::new();
        zip.by_name(&pkl_name)
            .and_then(|mut f| f.read_to_end(&mut pkl).map_err(Into::into))
            .map_err(|e| bad(format!("cannot read data.pkl ({e}); the file is corrupt or truncated")))?;
        let root = Machine {
            data: &pkl,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
        .run()
        .map_err(bad)?;
        let dict = match (key, root) {
            (Some(k), Obj::Dict(items)) => match items.into_iter().find(|(n, _)| *n == Obj::Str(k.into())) {
                Some((_, v)) => v,
                None => return Err(bad(format!("no '{k}' entry at the top level (expected {{\"{k}\": state_dict}})"))),
            },
            (_, root) => root,
        };
        let Obj::Dict(items) = dict else {
            return Err(bad("the state dict is not a dictionary".into()));
        };
        let mut entries = Vec::with_capacity(items.len());
        for (name, value) in items {
            let Obj::Str(name) = name else { continue };
            let info = tensor_info(&value).map_err(|m| bad(format!("entry '{name}' {m}")))?;
            entries.push((name, info));
        }
        Ok(Self {
            path: path.to_path_buf(),
            prefix,
            entries,
        })
    }

    /// Reads every tensor onto `device`, calling `each(done, total)` after each one.
    pub fn read_all(&self, device: &Device, each: &mut dyn FnMut(usize, usize)) -> Result<HashMap<String, Tensor>> {
        let mut zip = open_zip(&self.path)?;
        let mut out = HashMap::with_capacity(self.entries.len());
        for (i, (name, info)) in self.entries.iter().enumerate() {
            let t = read_tensor(&mut zip, &self.prefix, info).map_err(|m| Error::bad_file(&self.path, format!("tensor '{name}': {m}")))?;
            out.insert(name.clone(), t.to_device(device)?);
            each(i + 1, self.entries.len());
        }
        Ok(out)
    }

    /// Reads one tensor (on the CPU).
    pub fn read_one(&self, zip: &mut zip::ZipArchive<std::io::BufReader<std::fs::File>>, info: &TensorInfo) -> Result<Tensor> {
        read_tensor(zip, &self.prefix, info).map_err(|m| Error::bad_file(&self.path, m))
    }
}

/// Opens the zip archive of a torch checkpoint.
pub fn open_zip(path: &Path) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::bad_file(path, format!("not a torch zip checkpoint or truncated ({e}); re-download it")))
}

/// Reads the state dict of a torch zip checkpoint (under `key`, e.g. `"model"`) onto `device`.
pub fn read_state_dict(path: &Path, key: Option<&str>, device: &Device) -> Result<HashMap<String, Tensor>> {
    PthIndex::open(path, key)?.read_all(device, &mut |_, _| {})
}

fn read_tensor<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
    info: &TensorInfo,
) -> std::result::Result<Tensor, String> {
    let entry = format!("{prefix}data/{}", info.key);
    let mut f = zip.by_name(&entry).map_err(|e| format!("storage '{entry}' missing ({e})"))?;
    let esize = info.dtype.size_in_bytes();
    let numel: usize = info.shape.iter().product();
    // The last element any stride reaches, so a short storage is caught before reading.
    let span = if numel == 0 {
        0
    } else {
        1 + info.shape.iter().zip(&info.stride).map(|(d, s)| (d - 1) * s).sum::<usize>()
    };
    let need = (info.offset + span) * esize;
    if (f.size() as usize) < need {
        return Err(format!("storage holds {} bytes but the tensor needs {need} (truncated?)", f.size()));
    }
    let mut bytes = vec![0u8; need];
    f.read_exact(&mut bytes)
        .map_err(|e| format!("cannot read storage ({e}); file corrupt or truncated"))?;
    let flat = Tensor::from_raw_buffer(&bytes[info.offset * esize..], info.dtype, &[span], &Device::Cpu).map_err(|e| e.to_string())?;
    let contiguous: Vec<usize> = {
        let mut s = vec![1usize; info.shape.len()];
        for i in (0..info.shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * info.shape[i + 1];
        }
        s
    };
    if numel == 0 || info.stride == contiguous {
        return flat
            .narrow(0, 0, numel)
            .and_then(|t| t.reshape(Shape::from(info.shape.clone())))
            .map_err(|e| e.to_string());
    }
    // General strides: gather the elements through an index tensor.
    let mut idx = Vec::with_capacity(numel);
    let mut pos = vec![0usize; info.shape.len()];
    for _ in 0..numel {
        idx.push(u32::try_from(pos.iter().zip(&info.stride).map(|(p, s)| p * s).sum::<usize>()).map_err(|_| "tensor too large")?);
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
