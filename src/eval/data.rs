//! Task files: a folder with one subfolder per task and, per split, the rows in one of the formats
//! the data comes in, in the Hugging Face field names. For task `T` and split `S` the first of
//! these that exists is read (docs/eval.md):
//!
//! 1. `T/S.jsonl`: one row per line (`scripts/extract-olmo-tasks.py` writes this layout);
//! 2. `T/S/*.arrow`: a `datasets` split saved to disk (`data-00000-of-00001.arrow`, in the order
//!    of its `state.json` when present), or `T/S.arrow`;
//! 3. `T/S/*.parquet` (the hub's `refs/convert/parquet` layout, `0000.parquet`), `T/S.parquet`
//!    or `T/S-*.parquet` (`validation-00000-of-00001.parquet`).
//!
//! A row that is not usable is an error naming the file, the line or row, and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::eval::columnar::{self, Rows};
use crate::eval::tasks::{Doc, Task};

/// Splits tried, in order, when the task's own split has no file.
const FALLBACK_SPLITS: [&str; 2] = ["validation", "test"];

/// Where the rows of one split are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One JSONL file.
    Jsonl(PathBuf),
    /// Arrow IPC files, read in this order.
    Arrow(Vec<PathBuf>),
    /// Parquet files, read in this order.
    Parquet(Vec<PathBuf>),
}

impl Source {
    /// The file (or the first of several) the rows come from.
    pub fn path(&self) -> &Path {
        match self {
            Source::Jsonl(p) => p,
            Source::Arrow(v) | Source::Parquet(v) => v.first().map_or(Path::new(""), PathBuf::as_path),
        }
    }
}

/// The files of `split` in `folder` ending in `.ext`, sorted by name.
fn files_with(folder: &Path, ext: &str, prefix: Option<&str>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(folder)
        .map(|rd| {
            rd.filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    prefix.is_none_or(|pre| name.starts_with(pre))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The Arrow files of a `save_to_disk` folder: `state.json`'s `_data_files` in order when it
/// lists them, else every `*.arrow` by name.
fn arrow_files(folder: &Path) -> Vec<PathBuf> {
    let listed: Option<Vec<PathBuf>> = std::fs::read_to_string(folder.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("_data_files")?
                .as_array()?
                .iter()
                .map(|f| Some(folder.join(f.get("filename")?.as_str()?)))
                .collect()
        });
    match listed {
        Some(v) if !v.is_empty() && v.iter().all(|p| p.is_file()) => v,
        _ => files_with(folder, "arrow", None),
    }
}

/// Where `task`'s `split` is under `dir`, by the lookup order of the module docs.
pub fn find(dir: &Path, task: Task, split: &str) -> Option<Source> {
    find_in(&dir.join(task.name()), split)
}

/// Where `split` is in the folder `t` of one task (or one hub dataset config).
pub fn find_in(t: &Path, split: &str) -> Option<Source> {
    let jsonl = t.join(format!("{split}.jsonl"));
    if jsonl.is_file() {
        return Some(Source::Jsonl(jsonl));
    }
    let folder = t.join(split);
    let one = |ext: &str| Some(t.join(format!("{split}.{ext}"))).filter(|p| p.is_file());
    let arrow = arrow_files(&folder);
    if !arrow.is_empty() {
        return Some(Source::Arrow(arrow));
    }
    if let Some(p) = one("arrow") {
        return Some(Source::Arrow(vec![p]));
    }
    let mut parquet = files_with(&folder, "parquet", None);
    if parquet.is_empty() {
        parquet = one("parquet").into_iter().collect();
    }
    if parquet.is_empty() {
        parquet = files_with(t, "parquet", Some(&format!("{split}-")));
    }
    (!parquet.is_empty()).then_some(Source::Parquet(parquet))
}

/// The documents of one task split.
#[derive(Debug, Clone)]
pub struct TaskData {
    pub task: Task,
    /// The split scored (a label of every number).
    pub split: String,
    pub path: PathBuf,
    pub docs: Vec<Doc>,
    /// Few-shot examples: the task's few-shot split where the folder has it; `None`: drawn from
    /// `docs` (never the document itself).
    pub fewshot: Option<(String, Vec<Doc>)>,
}

/// Reads `task` from `dir`: the split given, else lm-eval's split, else the first of
/// validation/test that exists; and the few-shot split when it is there and differs.
pub fn load(dir: &Path, task: Task, split: Option<&str>) -> Result<TaskData> {
    load_folder(&dir.join(task.name()), task, split)
}

/// [`load`] from the folder of the task itself (`DIR/<task>`, or a hub dataset config's folder).
pub fn load_folder(t: &Path, task: Task, split: Option<&str>) -> Result<TaskData> {
    let split = match split {
        Some(s) => s.to_string(),
        None => std::iter::once(task.eval_split())
            .chain(FALLBACK_SPLITS)
            .find(|s| find_in(t, s).is_some())
            .unwrap_or(task.eval_split())
            .to_string(),
    };
    let Some(src) = find_in(t, &split) else {
        return Err(Error::bad_file(
            t.join(format!("{split}.jsonl")),
            format!(
                "no such file (nor {split}/*.arrow, {split}.arrow, {split}/*.parquet, {split}.parquet, {split}-*.parquet in {}): put {}'s {split} rows there (scripts/extract-olmo-tasks.py writes every task but lambada) or pick another split with --split",
                t.display(),
                task.name()
            ),
        ));
    };
    let docs = read_source(&src, task)?;
    let fs = task.fewshot_split();
    let fewshot = match (fs != split).then(|| find_in(t, fs)).flatten() {
        Some(fs_src) => Some((fs.to_string(), read_source(&fs_src, task)?)),
        None => None,
    };
    Ok(TaskData {
        task,
        split,
        path: src.path().to_path_buf(),
        docs,
        fewshot,
    })
}

/// A reader of one columnar file.
type ReadFn = fn(&Path) -> Result<Rows>;

/// Reads the documents of one split from wherever [`find`] found it.
pub fn read_source(src: &Source, task: Task) -> Result<Vec<Doc>> {
    let (files, read): (&[PathBuf], ReadFn) = match src {
        Source::Jsonl(p) => return read_jsonl(p, task),
        Source::Arrow(v) => (v, columnar::read_arrow),
        Source::Parquet(v) => (v, columnar::read_parquet),
    };
    let mut docs = Vec::new();
    for path in files {
        let rows = read(path)?;
        docs.extend(rows_to_docs(path, &rows, task)?);
    }
    if docs.is_empty() {
        return Err(Error::bad_file(
            src.path(),
            format!("no rows; the split of {} is empty", task.name()),
        ));
    }
    Ok(docs)
}

/// The documents of a columnar file's rows; an error names the file, the row and the field, and
/// lists the file's columns.
pub fn rows_to_docs(path: &Path, rows: &Rows, task: Task) -> Result<Vec<Doc>> {
    rows.rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            task.doc(row).map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "row {}: {e} (columns: {}); the file must hold {} rows with the Hugging Face field names (docs/eval.md)",
                        i + 1,
                        rows.columns.join(", "),
                        task.name()
                    ),
                )
            })
        })
        .collect()
}

/// Reads a JSONL file of `task` rows (blank lines ignored).
pub fn read_jsonl(path: &Path, task: Task) -> Result<Vec<Doc>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&text, task).map_err(|(line, msg)| {
        Error::bad_file(
            path,
            format!("line {line}: {msg}; each line must be one {} row as JSON", task.name()),
        )
    })
}

/// Parses JSONL text of `task` rows; an error carries the 1-based line number.
pub fn parse_jsonl(text: &str, task: Task) -> std::result::Result<Vec<Doc>, (usize, String)> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line).map_err(|e| (i + 1, format!("not JSON ({e})")))?;
        docs.push(task.doc(&row).map_err(|e| (i + 1, e.to_string()))?);
    }
    if docs.is_empty() {
        return Err((0, "no rows".into()));
    }
    Ok(docs)
}
