//! A checkpoint is untrusted input. Every hostile or broken file here is made by the test itself;
//! each must give a one-line error naming the file, never a panic, an abort, a stack overflow or a
//! huge allocation.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use blackmamba::model::pth::{parse_pickle, PthIndex, MAX_PICKLE_BYTES};
use blackmamba::model::pth_write;
use candle_core::{Device, Tensor};

/// A tiny pickle writer (protocol 2), enough to spell state dicts and hostile variations.
#[derive(Default)]
struct P(Vec<u8>);

impl P {
    fn op(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// Any i64, as LONG1 with 8 bytes.
    fn int(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&[0x8a, 8]);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn global(&mut self, m: &str, n: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
        self
    }
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.op(b'(');
        for &x in v {
            self.int(x);
        }
        self.op(b't')
    }
}

/// `{"model": {name: f32 tensor(shape, stride, offset) on storage "0"}}`.
fn state_dict_pickle(name: &str, shape: &[i64], stride: &[i64], offset: i64) -> Vec<u8> {
    let mut p = P::default();
    p.op(0x80).op(2).op(b'}').str("model").op(b'}').str(name);
    p.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
    p.op(b'(')
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(1)
        .op(b't')
        .op(b'Q');
    p.int(offset).ints(shape).ints(stride).op(0x89);
    p.global("collections", "OrderedDict").op(b')').op(b'R').op(b't').op(b'R');
    p.op(b's').op(b's').op(b'.');
    p.0
}

/// A torch zip: `archive/data.pkl` and `archive/data/<key>` entries, stored or deflated.
fn torch_zip(pkl: &[u8], storages: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// Rewrites the declared uncompressed size of entry `name`, in its local and central headers.
fn lie_about_size(zip: &mut [u8], name: &str, size: u32) {
    let mut patched = 0;
    for i in 0..zip.len().saturating_sub(46) {
        let sig = u32::from_le_bytes(zip[i..i + 4].try_into().unwrap());
        let (size_at, name_len_at, name_at) = match sig {
            0x0403_4b50 => (22, 26, 30),
            0x0201_4b50 => (24, 28, 46),
            _ => continue,
        };
        let n = u16::from_le_bytes(zip[i + name_len_at..i + name_len_at + 2].try_into().unwrap()) as usize;
        if zip.get(i + name_at..i + name_at + n) == Some(name.as_bytes()) {
            zip[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "both headers of {name} patched");
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens and reads the checkpoint; the error as text (it must be one).
fn pth_err(path: &Path) -> String {
    let r = PthIndex::open(path, Some("model")).and_then(|i| i.read_all(&Device::Cpu, &mut |_, _| {}));
    match r {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains(&path.display().to_string()), "the error names the file: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
            e
        }
    }
}

#[test]
fn repeated_memo_fetches_do_not_grow_exponentially() {
    // t = []; then 60 times: t = (t, t) -- 2^60 nodes if every fetch copied its object
    let mut p = P::default();
    p.op(0x80).op(2).op(b']').op(b'q').op(0);
    for _ in 0..60 {
        p.op(b'h').op(0).op(b'h').op(0).op(0x86).op(b'q').op(0);
    }
    p.op(b'.');
    assert!(p.0.len() < 450, "a {}-byte pickle", p.0.len());
    let t0 = std::time::Instant::now();
    let e = parse_pickle(&p.0, Some("model")).unwrap_err();
    assert!(e.contains("not a dictionary"), "{e}");
    assert!(t0.elapsed().as_secs() < 5);
    // and through a checkpoint file
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "pytorch_model.bin", &torch_zip(&p.0, &[], false));
    assert!(pth_err(&f).contains("not a dictionary"));
}

#[test]
fn too_many_memo_entries_are_refused() {
    // None, then MEMOIZE two million times: one memo entry per pickle byte
    let mut pkl = vec![0x80, 2, b'N'];
    pkl.extend(std::iter::repeat_n(0x94u8, 2_000_000));
    pkl.push(b'.');
    let e = parse_pickle(&pkl, None).unwrap_err();
    assert!(e.contains("memo entries"), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // None wrapped in a million one-element tuples
    let mut pkl = vec![0x80, 2, b'N'];
    pkl.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    pkl.push(b'.');
    let e = parse_pickle(&pkl, Some("model")).unwrap_err();
    assert!(e.contains("not a dictionary"), "{e}");
    // a million nested lists, appended into each other, as the state dict
    let mut pkl = vec![0x80, 2, b'}', b'X', 5, 0, 0, 0];
    pkl.extend_from_slice(b"model");
    pkl.extend(std::iter::repeat_n(b']', 1_000_000));
    pkl.extend(std::iter::repeat_n(b'a', 999_999));
    pkl.extend_from_slice(b"s.");
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "pytorch_model.bin", &torch_zip(&pkl, &[], true));
    assert!(pth_err(&f).contains("not a dictionary"));
}

#[test]
fn overflowing_shapes_strides_and_offsets_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let storage = [0u8; 64];
    let cases: [(&[i64], &[i64], i64); 4] = [
        (&[1 << 40, 1 << 40], &[1 << 40, 1], 0), // shape product overflows
        (&[4], &[1], i64::MAX),                  // offset * element size overflows
        (&[3, 2], &[i64::MAX, 1], 0),            // (dim - 1) * stride overflows
        (&[1 << 62], &[1], 0),                   // elements * 4 bytes overflows
    ];
    for (i, (shape, stride, offset)) in cases.into_iter().enumerate() {
        let pkl = state_dict_pickle("w", shape, stride, offset);
        let f = write(d.path(), &format!("case{i}.bin"), &torch_zip(&pkl, &[("0", &storage)], false));
        let e = pth_err(&f);
        assert!(e.contains("'w'") && e.contains("overflows"), "case {i}: {e}");
    }
    // a shape that fits in memory arithmetic but not in the storage asks for nothing
    let pkl = state_dict_pickle("w", &[1 << 40], &[1], 0);
    let f = write(d.path(), "big.bin", &torch_zip(&pkl, &[("0", &storage)], false));
    let e = pth_err(&f);
    assert!(e.contains("holds 64"), "{e}");
    // overlapping strides (one element viewed 2^20 times) cannot inflate a tiny storage
    let pkl = state_dict_pickle("w", &[1 << 20], &[0], 0);
    let f = write(d.path(), "overlap.bin", &torch_zip(&pkl, &[("0", &storage)], false));
    assert!(pth_err(&f).contains("overlapping strides"));
}

#[test]
fn declared_sizes_deflate_cannot_produce_are_refused_before_reading() {
    let d = tempfile::tempdir().unwrap();
    // 64 kB of zeros deflated, declared as ~4 GB: a 4 GB tensor on a tiny file
    let zeros = vec![0u8; 1 << 16];
    let pkl = state_dict_pickle("w", &[1 << 30], &[1], 0);
    let mut z = torch_zip(&pkl, &[("0", &zeros)], true);
    lie_about_size(&mut z, "archive/data/0", u32::MAX);
    let f = write(d.path(), "bomb.bin", &z);
    let e = match PthIndex::open(&f, Some("model")) {
        Ok(_) => panic!("indexed a 4 GB tensor from a {}-byte file", z.len()),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bomb.bin") && e.contains("more than deflate can produce"), "{e}");
    // a stored entry must hold what it declares
    let mut z = torch_zip(&pkl, &[("0", &zeros)], false);
    lie_about_size(&mut z, "archive/data/0", u32::MAX);
    let f = write(d.path(), "stored.bin", &z);
    assert!(pth_err(&f).contains("declares 4294967295 bytes but holds 65536"));
}

#[test]
fn an_oversized_pickle_is_not_read() {
    // a data.pkl of zeros just over the limit deflates to a few kB; it is refused unread
    let pkl = vec![0u8; usize::try_from(MAX_PICKLE_BYTES).unwrap() + 1];
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "pytorch_model.bin", &torch_zip(&pkl, &[], true));
    let e = pth_err(&f);
    assert!(e.contains("data.pkl") && e.contains("declares"), "{e}");
}

#[test]
fn a_flipped_byte_in_tensor_data_fails_the_crc_check() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("w.bin");
    let marker = 123_456.78f32;
    let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, marker], 4, &Device::Cpu).unwrap();
    pth_write::write(&f, &[("w".to_string(), t)]).unwrap();
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.windows(4).position(|w| w == marker.to_le_bytes()).unwrap();
    bytes[at] ^= 1;
    std::fs::write(&f, &bytes).unwrap();
    let e = pth_err(&f);
    assert!(e.contains("CRC") || e.contains("checksum"), "{e}");
}

#[test]
fn a_config_with_absurd_sizes_is_refused_instead_of_overflowing() {
    use blackmamba::model::config::Config;
    let base = serde_json::json!({
        "num_layers": 2, "hidden_size": 32, "vocab_size": 40, "mamba_moe_layers": ["r", "8"],
        "ffn_hidden_size": 24
    });
    assert!(Config::from_json_str(&base.to_string()).is_ok());
    // d_inner = expansion_factor * hidden_size and the parameter count overflowed these
    for (key, value) in [
        ("hidden_size", 1u64 << 40),
        ("expansion_factor", 1 << 40),
        ("ffn_hidden_size", 1 << 60),
        ("state_size", 1 << 40),
    ] {
        let mut v = base.clone();
        v[key] = value.into();
        let e = Config::from_json_str(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("more than"), "{key}: {e}");
    }
}
