//! Task rows from columnar files, as the data comes: Hugging Face `datasets` saved to disk (Arrow
//! IPC stream files, `data-00000-of-00001.arrow`; the IPC file format is read too) and hub Parquet
//! (`validation-00000-of-00001.parquet`, `0000.parquet`). Each row becomes the JSON object the same
//! row has in a JSONL file (strings, numbers, booleans, lists as arrays, structs as objects), so
//! [`crate::eval::tasks::Task::doc`] reads every format alike.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The rows of a file and the names of its columns.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Value>,
}

/// The Arrow IPC end-of-stream marker: the continuation token, then a zero length (pyarrow since
/// 0.15; the bare zero length of older writers cannot be told from a body's zero padding).
const EOS: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
/// The first bytes of an Arrow IPC *file* (random-access format).
const FILE_MAGIC: &[u8; 6] = b"ARROW1";

/// Reads an Arrow IPC stream (what `datasets.save_to_disk` writes) or IPC file.
pub fn read_arrow(path: &Path) -> Result<Rows> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 6];
    let is_file = len >= 6 && f.read_exact(&mut head).is_ok() && &head == FILE_MAGIC;
    if !is_file {
        // The stream reader ends quietly at a message boundary; a stream cut there (a partial
        // copy or download) is told by its missing end-of-stream marker.
        let mut tail = [0u8; 8];
        let tail_ok = len >= 8 && f.seek(SeekFrom::End(-8)).is_ok() && f.read_exact(&mut tail).is_ok() && tail == EOS;
        if !tail_ok {
            return Err(bad(
                "truncated Arrow stream (no end-of-stream marker); copy or download the file again (datasets' save_to_disk writes it whole)".into(),
            ));
        }
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    let broken = |e: arrow_schema::ArrowError| {
        bad(format!(
            "not a readable Arrow file ({e}); copy or download it again, or give the split as .jsonl or .parquet"
        ))
    };
    let batches: Vec<RecordBatch> = if is_file {
        let r = arrow_ipc::reader::FileReader::try_new(BufReader::new(f), None).map_err(broken)?;
        r.collect::<std::result::Result<_, _>>().map_err(broken)?
    } else {
        let r = arrow_ipc::reader::StreamReader::try_new(BufReader::new(f), None).map_err(broken)?;
        r.collect::<std::result::Result<_, _>>().map_err(broken)?
    };
    batches_to_rows(&batches)
}

/// Reads a Parquet file (any row groups; Snappy-compressed or uncompressed pages).
pub fn read_parquet(path: &Path) -> Result<Rows> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let broken = |e: String| {
        Error::bad_file(
            path,
            format!("not a readable Parquet file ({e}); copy or download it again (pages must be Snappy-compressed or plain), or give the split as .jsonl"),
        )
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| broken(e.to_string()))?;
    let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>().map_err(|e| broken(e.to_string()))?;
    batches_to_rows(&batches)
}

/// Every row of `batches` as a JSON object keyed by column name.
pub fn batches_to_rows(batches: &[RecordBatch]) -> Result<Rows> {
    let mut out = Rows::default();
    for b in batches {
        let schema = b.schema();
        if out.columns.is_empty() {
            out.columns = schema.fields().iter().map(|f| f.name().clone()).collect();
        }
        for i in 0..b.num_rows() {
            let mut row = Map::with_capacity(b.num_columns());
            for (field, col) in schema.fields().iter().zip(b.columns()) {
                row.insert(field.name().clone(), value(col.as_ref(), i));
            }
            out.rows.push(Value::Object(row));
        }
    }
    Ok(out)
}

/// Row `i` of a column as JSON; a type no task uses (dates, binary, ...) reads as null, which the
/// task then reports as a field of the wrong type.
pub fn value(col: &dyn Array, i: usize) -> Value {
    macro_rules! num {
        ($t:ty) => {
            Value::from(col.as_primitive::<$t>().value(i))
        };
    }
    if col.is_null(i) {
        return Value::Null;
    }
    match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(col.as_string_view().value(i)),
        DataType::Boolean => Value::from(col.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        DataType::List(_) => list(col.as_list::<i32>().value(i).as_ref()),
        DataType::LargeList(_) => list(col.as_list::<i64>().value(i).as_ref()),
        DataType::FixedSizeList(..) => list(col.as_fixed_size_list().value(i).as_ref()),
        DataType::Struct(fields) => {
            let s = col.as_struct();
            let obj = fields
                .iter()
                .zip(s.columns())
                .map(|(f, c)| (f.name().clone(), value(c.as_ref(), i)))
                .collect();
            Value::Object(obj)
        }
        _ => Value::Null,
    }
}

fn list(items: &dyn Array) -> Value {
    Value::Array((0..items.len()).map(|j| value(items, j)).collect())
}
