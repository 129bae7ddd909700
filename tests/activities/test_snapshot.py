"""snapshot_dataset on the tiny model's real tokenizer: the split preflight planned, copies on
one side only, an eval_dataset in place of the held-out rows, and bounded work on huge rows.

    python -m pytest tests/activities/test_snapshot.py -q
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from activities.preflight import preflight_report
from activities.snapshot import snapshot_dataset
from activities.demo_data import write_demo_dataset
from schemas.hardware import HardwareInfo
from schemas.run_spec import RunSpec
from store.artifacts import LocalArtifactStore

ROOTS = (Path(tempfile.gettempdir()).resolve(),)
CPU = {"device": "cpu", "cpu_count": 2, "memory_available_bytes": 16 * 2**30, "bitsandbytes_usable": True, "disk_free_bytes": 2**40}


def snapshot(tmp_path, model, data, **over):
    spec = RunSpec.model_validate({"base_model": str(model), "dataset": str(data), **over})
    report = preflight_report("run_snap", spec, db=None, store=None, hardware=HardwareInfo(**CPU), roots=ROOTS)
    assert report.ok, report.errors
    store = LocalArtifactStore(tmp_path / "store")
    return report, snapshot_dataset(report.plan, None, store, roots=ROOTS), store


def rows_of(store, key) -> list[dict]:
    return [json.loads(x) for x in store.local_file(key).read_text().splitlines()]


def test_copies_of_a_row_never_straddle_the_split(tiny_model, tmp_path):
    lines = write_demo_dataset(tmp_path / "demo.jsonl", rows=300).read_text().splitlines()
    # 300 distinct rows, 30 of them copied 2 to 5 more times: 403 rows in all.
    with_copies = lines + [lines[i] for i in range(30) for _ in range(2 + i % 4)]
    data = tmp_path / "copies.jsonl"
    data.write_text("".join(x + "\n" for x in with_copies))
    report, snap, store = snapshot(tmp_path, tiny_model, data)
    train, held = rows_of(store, snap.train_uri), rows_of(store, snap.eval_uri)
    assert (len(train), len(held)) == (snap.train_rows, snap.eval_rows) == (report.plan.train_rows, report.plan.eval_rows)
    assert len(train) + len(held) == 403 and abs(len(held) - 40) <= 5
    trained = {tuple(r["input_ids"]) for r in train}
    assert not [r["line"] for r in held if tuple(r["input_ids"]) in trained]
    assert snap.eval_in_train_rows == 0 and snap.distinct_rows == 300


def test_an_eval_dataset_is_the_eval_split_less_its_copies_of_training_rows(tiny_model, tmp_path):
    lines = write_demo_dataset(tmp_path / "demo.jsonl", rows=150).read_text().splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(x + "\n" for x in lines[:120]))
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(x + "\n" for x in lines[120:] + [lines[3]]))  # line 31 is a training row
    report, snap, store = snapshot(tmp_path, tiny_model, data, eval_dataset=str(valid))
    held = rows_of(store, snap.eval_uri)
    assert [r["line"] for r in held] == list(range(1, 31)) and snap.train_rows == 120
    assert (snap.eval_rows, snap.eval_excluded_rows, snap.eval_in_train_rows) == (30, 1, 0) == (report.plan.eval_rows, 1, 0)
    assert snap.eval_source == "valid.jsonl"
    assert snap.eval_source_sha256 == hashlib.sha256(valid.read_bytes()).hexdigest()
    assert store.exists(f"datasets/sha256/{snap.eval_source_sha256}.jsonl")


def test_megabyte_rows_are_cut_and_counted(tiny_model, tmp_path):
    lines = write_demo_dataset(tmp_path / "demo.jsonl", rows=200).read_text().splitlines()
    huge = json.dumps({"instruction": "sky blue green " * 70_000, "input": "", "output": "yes"})
    data = tmp_path / "huge.jsonl"
    data.write_text("".join(x + "\n" for x in lines[:100] + [huge.replace("yes", f"yes {i}") for i in range(3)] + lines[100:]))
    report, snap, store = snapshot(tmp_path, tiny_model, data, hyperparameters={"max_seq_len": 128})
    rows = rows_of(store, snap.train_uri) + rows_of(store, snap.eval_uri)
    assert max(len(r["input_ids"]) for r in rows) == 128
    cut = [r for r in rows if r["line"] in (101, 102, 103)]
    assert len(cut) == 3 and all(len(r["input_ids"]) == 128 for r in cut)
    train_lines = {r["line"] for r in rows_of(store, snap.train_uri)}
    assert snap.token_stats.answer_lost_rows == len(train_lines & {101, 102, 103})
    assert report.dataset.answer_lost_rows == 3
