//! Task folders in the formats the data comes in: the same HellaSwag- and ARC-shaped rows written
//! as JSONL, as a `datasets` folder saved to disk (Arrow IPC stream) and as hub Parquet give the
//! same documents and exactly the same scores; a cut file or a missing column fails with one line
//! naming the file (and the column) and the fix.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields};
use blackmamba::eval::data::{self, Source};
use blackmamba::eval::run::{evaluate, EvalOpts};
use blackmamba::eval::tasks::Task;
use candle_core::{DType, Device};
use serde_json::{json, Value};

fn hellaswag_rows() -> Vec<Value> {
    (0..5)
        .map(|i| {
            json!({
                "ind": i,
                "activity_label": format!("Cooking {i}"),
                "ctx_a": "A man stands in a kitchen.",
                "ctx_b": "he [title] picks up a pan",
                "endings": ["cooks an egg.", "throws the pan away.", "sings a song [header] loudly.", "sleeps."],
                "label": format!("{}", i % 4),
            })
        })
        .collect()
}

fn arc_rows() -> Vec<Value> {
    (0..4)
        .map(|i| {
            let labels: Vec<String> = if i == 3 {
                ["1", "2", "3"].map(String::from).to_vec()
            } else {
                ["A", "B", "C"].map(String::from).to_vec()
            };
            json!({
                "id": format!("q{i}"),
                "question": format!("Which one is warm, case {i}?"),
                "choices": {"text": ["ice", "the sun", "snow"], "label": labels},
                "answerKey": labels[1],
            })
        })
        .collect()
}

fn strings(rows: &[Value], key: &str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r[key].as_str().unwrap())))
}

fn string_lists(rows: impl Iterator<Item = Value>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for s in r.as_array().unwrap() {
            b.values().append_value(s.as_str().unwrap());
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn hellaswag_batch(rows: &[Value]) -> RecordBatch {
    let ind: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r["ind"].as_i64().unwrap())));
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("ind", ind),
        ("activity_label", strings(rows, "activity_label")),
        ("ctx_a", strings(rows, "ctx_a")),
        ("ctx_b", strings(rows, "ctx_b")),
        ("endings", string_lists(rows.iter().map(|r| r["endings"].clone()))),
        ("label", strings(rows, "label")),
    ];
    RecordBatch::try_from_iter(cols).unwrap()
}

fn arc_batch(rows: &[Value]) -> RecordBatch {
    let text = string_lists(rows.iter().map(|r| r["choices"]["text"].clone()));
    let label = string_lists(rows.iter().map(|r| r["choices"]["label"].clone()));
    let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let fields = Fields::from(vec![Field::new("text", list.clone(), true), Field::new("label", list, true)]);
    let choices: ArrayRef = Arc::new(StructArray::new(fields, vec![text, label], None));
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("id", strings(rows, "id")),
        ("question", strings(rows, "question")),
        ("choices", choices),
        ("answerKey", strings(rows, "answerKey")),
    ];
    RecordBatch::try_from_iter(cols).unwrap()
}

fn write_jsonl(dir: &Path, task: &str, rows: &[Value]) {
    std::fs::create_dir_all(dir.join(task)).unwrap();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join(task).join("validation.jsonl"), text).unwrap();
}

/// A `datasets.save_to_disk` split: the stream in two batches, `state.json`, `dataset_info.json`.
fn write_arrow(dir: &Path, task: &str, batch: &RecordBatch) {
    let d = dir.join(task).join("validation");
    std::fs::create_dir_all(&d).unwrap();
    let f = std::fs::File::create(d.join("data-00000-of-00001.arrow")).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
    let half = batch.num_rows() / 2;
    w.write(&batch.slice(0, half)).unwrap();
    w.write(&batch.slice(half, batch.num_rows() - half)).unwrap();
    w.finish().unwrap();
    let state = json!({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "validation"});
    std::fs::write(d.join("state.json"), state.to_string()).unwrap();
    std::fs::write(d.join("dataset_info.json"), "{}").unwrap();
}

/// A hub Parquet shard, `validation-00000-of-00001.parquet`, Snappy-compressed as the hub's.
fn write_parquet(dir: &Path, task: &str, batch: &RecordBatch) {
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;
    std::fs::create_dir_all(dir.join(task)).unwrap();
    let f = std::fs::File::create(dir.join(task).join("validation-00000-of-00001.parquet")).unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(3))
        .build();
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn folders() -> [tempfile::TempDir; 3] {
    let dirs = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let (hs, arc) = (hellaswag_rows(), arc_rows());
    write_jsonl(dirs[0].path(), "hellaswag", &hs);
    write_jsonl(dirs[0].path(), "arc_easy", &arc);
    write_arrow(dirs[1].path(), "hellaswag", &hellaswag_batch(&hs));
    write_arrow(dirs[1].path(), "arc_easy", &arc_batch(&arc));
    write_parquet(dirs[2].path(), "hellaswag", &hellaswag_batch(&hs));
    write_parquet(dirs[2].path(), "arc_easy", &arc_batch(&arc));
    dirs
}

#[test]
fn arrow_and_parquet_folders_score_exactly_as_jsonl() {
    let [jsonl, arrow, parquet] = folders();
    let (model, tok) = blackmamba::embedded::load(&Device::Cpu, DType::F32).unwrap();
    let opts = EvalOpts {
        shots: 1,
        limit: None,
        seed: 3,
        reuse_state: true,
    };
    for task in [Task::Hellaswag, Task::ArcEasy] {
        let want = data::load(jsonl.path(), task, None).unwrap();
        assert_eq!(want.split, "validation");
        let base = evaluate(&model, &tok, 0, &want, &opts, &mut |_, _| {}).unwrap();
        for (dir, ext) in [(arrow.path(), "arrow"), (parquet.path(), "parquet")] {
            let got = data::load(dir, task, None).unwrap();
            assert!(got.path.extension().is_some_and(|e| e == ext), "{}", got.path.display());
            assert_eq!(got.docs, want.docs, "{task:?} from {ext}");
            assert_eq!(got.split, want.split);
            let r = evaluate(&model, &tok, 0, &got, &opts, &mut |_, _| {}).unwrap();
            assert_eq!((r.docs, &r.split, &r.fewshot_from), (base.docs, &base.split, &base.fewshot_from));
            let values = |r: &blackmamba::eval::run::TaskReport| -> Vec<(&str, f64, Option<f64>)> {
                r.metrics.iter().map(|m| (m.metric, m.value, m.stderr)).collect()
            };
            assert_eq!(values(&r), values(&base), "{task:?} from {ext}");
        }
    }
}

#[test]
fn lookup_order_prefers_jsonl_then_arrow_then_parquet() {
    let [jsonl, arrow, parquet] = folders();
    let hs = hellaswag_rows();
    let find = |d: &Path| data::find(d, Task::Hellaswag, "validation").unwrap();
    assert!(matches!(find(parquet.path()), Source::Parquet(v) if v.len() == 1));
    write_arrow(parquet.path(), "hellaswag", &hellaswag_batch(&hs));
    assert!(matches!(find(parquet.path()), Source::Arrow(_)));
    write_jsonl(parquet.path(), "hellaswag", &hs[..2]);
    assert!(matches!(find(parquet.path()), Source::Jsonl(_)));
    assert_eq!(data::load(parquet.path(), Task::Hellaswag, None).unwrap().docs.len(), 2);
    // The refs/convert/parquet layout: validation/0000.parquet.
    let conv = jsonl.path().join("arc_easy/validation");
    std::fs::create_dir_all(&conv).unwrap();
    std::fs::remove_file(jsonl.path().join("arc_easy/validation.jsonl")).unwrap();
    std::fs::copy(
        parquet.path().join("arc_easy/validation-00000-of-00001.parquet"),
        conv.join("0000.parquet"),
    )
    .unwrap();
    let src = data::find(jsonl.path(), Task::ArcEasy, "validation").unwrap();
    assert!(
        matches!(&src, Source::Parquet(v) if v[0].ends_with("validation/0000.parquet")),
        "{src:?}"
    );
    assert_eq!(data::load(jsonl.path(), Task::ArcEasy, None).unwrap().docs.len(), 4);
    std::fs::rename(
        arrow.path().join("hellaswag/validation/data-00000-of-00001.arrow"),
        arrow.path().join("hellaswag/validation.arrow"),
    )
    .unwrap();
    assert!(matches!(find(arrow.path()), Source::Arrow(v) if v[0].ends_with("hellaswag/validation.arrow")));
    assert!(data::find(arrow.path(), Task::Piqa, "validation").is_none());
    let e = data::load(arrow.path(), Task::Piqa, None).unwrap_err().to_string();
    assert!(e.contains(".parquet") && e.contains("--split") && !e.contains('\n'), "{e}");
}

#[test]
fn cut_files_and_missing_columns_fail_with_one_line() {
    let [_j, arrow, parquet] = folders();
    let file = arrow.path().join("hellaswag/validation/data-00000-of-00001.arrow");
    let bytes = std::fs::read(&file).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 8] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let e = data::load(arrow.path(), Task::Hellaswag, None).unwrap_err().to_string();
        assert!(
            e.contains("data-00000-of-00001.arrow") && e.contains("again") && !e.contains('\n'),
            "cut at {cut}: {e}"
        );
    }
    let pq = parquet.path().join("arc_easy/validation-00000-of-00001.parquet");
    let bytes = std::fs::read(&pq).unwrap();
    std::fs::write(&pq, &bytes[..bytes.len() - 20]).unwrap();
    let e = data::load(parquet.path(), Task::ArcEasy, None).unwrap_err().to_string();
    assert!(
        e.contains("validation-00000-of-00001.parquet") && e.contains("Parquet") && !e.contains('\n'),
        "{e}"
    );
    // A column the task needs is missing: the error names it and lists the file's columns.
    let batch = hellaswag_batch(&hellaswag_rows());
    let idx = batch.schema().index_of("ctx_b").unwrap();
    let mut without = batch.clone();
    without.remove_column(idx);
    write_arrow(arrow.path(), "hellaswag", &without);
    let e = data::load(arrow.path(), Task::Hellaswag, None).unwrap_err().to_string();
    assert!(
        e.contains("ctx_b") && e.contains("row 1") && e.contains("ctx_a") && !e.contains('\n'),
        "{e}"
    );
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub cache holding the Parquet conversion of Rowan/hellaswag, as `huggingface_hub` lays it out.
fn fake_hub_cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--Rowan--hellaswag");
    std::fs::create_dir_all(repo.join("refs/refs/convert")).unwrap();
    std::fs::write(repo.join("refs/refs/convert/parquet"), COMMIT).unwrap();
    let split = repo.join("snapshots").join(COMMIT).join("default/validation");
    std::fs::create_dir_all(&split).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_parquet(tmp.path(), "hellaswag", &hellaswag_batch(&hellaswag_rows()));
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::rename(
        tmp.path().join("hellaswag/validation-00000-of-00001.parquet"),
        repo.join("blobs/abc123"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../../../blobs/abc123", split.join("0000.parquet")).unwrap();
    cache
}

fn offline_env(cache: &Path) -> blackmamba::hub::HubEnv {
    blackmamba::hub::HubEnv {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
        convert_cache: None,
    }
}

#[test]
fn hub_tasks_resolve_offline_from_the_cache() {
    use blackmamba::eval::hub_tasks;
    let cache = fake_hub_cache();
    let env = offline_env(cache.path());
    let folder = hub_tasks::resolve(&env, Task::Hellaswag, None).unwrap();
    assert!(folder.ends_with(format!("snapshots/{COMMIT}/default")), "{}", folder.display());
    let got = data::load_folder(&folder, Task::Hellaswag, None).unwrap();
    let jsonl = tempfile::tempdir().unwrap();
    write_jsonl(jsonl.path(), "hellaswag", &hellaswag_rows());
    assert_eq!(got.docs, data::load(jsonl.path(), Task::Hellaswag, None).unwrap().docs);
    assert_eq!(got.split, "validation");
    // Not cached and offline: one line naming the dataset id and --task-dir.
    for (task, id) in [
        (Task::ArcChallenge, "allenai/ai2_arc (ARC-Challenge"),
        (Task::Winogrande, "allenai/winogrande (winogrande_xl"),
    ] {
        let e = hub_tasks::resolve(&env, task, None).unwrap_err().to_string();
        assert!(
            e.contains(id) && e.contains("--task-dir") && e.contains("HF_HUB_OFFLINE") && !e.contains('\n'),
            "{e}"
        );
    }
    let e = hub_tasks::resolve(&env, Task::Hellaswag, Some("train")).unwrap_err().to_string();
    assert!(e.contains("Rowan/hellaswag") && e.contains("train"), "{e}");

    // The command: no --task-dir, the same cache through HF_HUB_CACHE.
    let run = |task: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_blackmamba"))
            .args(["eval", "--dtype", "f32", "--task", task, "--limit", "3", "--json"])
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = run("hellaswag");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (rep["tasks"][0]["task"].as_str(), rep["tasks"][0]["docs"].as_u64()),
        (Some("hellaswag"), Some(3))
    );
    let o = run("piqa");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("baber/piqa") && err.contains("--task-dir"),
        "{err}"
    );
}
