//! Writes a state dict as a torch zip checkpoint, `{"model": OrderedDict(name -> tensor)}`, in the
//! layout `torch.save` uses (pickle protocol 2, one stored entry per storage). Used by tests to make
//! checkpoints in the release format, and by tools that export for PyTorch users.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn int(&mut self, v: usize) {
        self.0.push(b'J');
        self.0.extend_from_slice(&i32::try_from(v).unwrap_or(i32::MAX).to_le_bytes());
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    fn tuple(&mut self, v: &[usize]) {
        self.op(b'(');
        for &x in v {
            self.int(x);
        }
        self.op(b't');
    }
}

fn storage_class(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F16 => "HalfStorage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => return Err(Error::Invalid(format!("cannot write {other:?} tensors to a torch checkpoint"))),
    })
}

/// Writes `tensors` to `path` atomically.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut p = Pickle(vec![0x80, 2]);
    p.op(b'}');
    p.str("model");
    p.ordered_dict();
    p.op(b'(');
    let tensors: Vec<(&String, Tensor)> = tensors.iter().map(|(n, t)| Ok((n, t.contiguous()?))).collect::<Result<_>>()?;
    for (i, (name, t)) in tensors.iter().enumerate() {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        p.op(b'(');
        p.str("storage");
        p.global("torch", storage_class(t.dtype())?);
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.elem_count());
        p.op(b't');
        p.op(b'Q');
        p.int(0);
        p.tuple(t.dims());
        p.tuple(t.stride());
        p.op(0x89);
        p.ordered_dict();
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u');
    p.op(b's');
    p.op(b'.');

    let tmp = crate::fsutil::tmp_path(path);
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let zerr = |e: zip::result::ZipError| Error::bad_file(&tmp, e.to_string());
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).map_err(zerr)?;
    zip.write_all(&p.0).map_err(io)?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).map_err(zerr)?;
        let t = t.flatten_all()?;
        let bytes = tensor_bytes(&t)?;
        zip.write_all(&bytes).map_err(io)?;
    }
    zip.start_file("archive/version", opts).map_err(zerr)?;
    zip.write_all(b"3\n").map_err(io)?;
    zip.finish().map_err(zerr)?.flush().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Little-endian bytes of a flat tensor.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => return Err(Error::Invalid(format!("cannot write {other:?} tensors"))),
    })
}
