//! Task files: a folder with one subfolder per task and one JSONL file per split, each line one
//! dataset row in the Hugging Face field names (`DIR/hellaswag/validation.jsonl`,
//! `DIR/arc_easy/test.jsonl`, ...; `scripts/extract-olmo-tasks.py` writes this layout). A line
//! that is not a usable row is an error naming the file, the line and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::eval::tasks::{Doc, Task};

/// Splits tried, in order, when the task's own split has no file.
const FALLBACK_SPLITS: [&str; 2] = ["validation", "test"];

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

/// The file of `task`'s `split` under `dir`.
pub fn split_path(dir: &Path, task: Task, split: &str) -> PathBuf {
    dir.join(task.name()).join(format!("{split}.jsonl"))
}

/// Reads `task` from `dir`: the split given, else lm-eval's split, else the first of
/// validation/test that exists; and the few-shot split when it is there and differs.
pub fn load(dir: &Path, task: Task, split: Option<&str>) -> Result<TaskData> {
    let split = match split {
        Some(s) => s.to_string(),
        None => std::iter::once(task.eval_split())
            .chain(FALLBACK_SPLITS)
            .find(|s| split_path(dir, task, s).is_file())
            .unwrap_or(task.eval_split())
            .to_string(),
    };
    let path = split_path(dir, task, &split);
    if !path.is_file() {
        return Err(Error::bad_file(
            &path,
            format!(
                "no such file: put {}'s {split} rows there as JSONL (scripts/extract-olmo-tasks.py writes every task but lambada) or pick another split with --split",
                task.name()
            ),
        ));
    }
    let docs = read_jsonl(&path, task)?;
    let fs = task.fewshot_split();
    let fs_path = split_path(dir, task, fs);
    let fewshot = match fs != split && fs_path.is_file() {
        true => Some((fs.to_string(), read_jsonl(&fs_path, task)?)),
        false => None,
    };
    Ok(TaskData {
        task,
        split,
        path,
        docs,
        fewshot,
    })
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
