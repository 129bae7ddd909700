"""Eval that measures unseen rows, through the real stack (Temporal dev server, both workers,
real training on the tiny model): copies stay on one side of the split, and an eval_dataset
replaces the held-out rows without its copies of training rows.

    python -m pytest tests/workflows/test_eval_split.py -q
"""

from __future__ import annotations

import json

from activities.demo_data import write_demo_dataset
from schemas.run_state import RunState
from tests.conftest import small_spec
from tests.workflows.test_tune_llm import run_to_end


def stored_rows(stack, key) -> list[dict]:
    return [json.loads(x) for x in stack.store.local_file(key).read_text().splitlines()]


def preflight_warnings(stack, run_id) -> list[str]:
    event = next(e for e in stack.db.events(run_id) if e.kind == "preflight")
    return event.data["warnings"]


async def test_a_run_on_many_copies_never_evaluates_a_training_row(stack, tiny_model, tmp_path):
    lines = write_demo_dataset(tmp_path / "demo.jsonl", rows=100).read_text().splitlines()
    # 100 distinct rows; the first 20 occur 4 times each: 160 rows, a third of them copies.
    data = tmp_path / "copies.jsonl"
    data.write_text("".join(x + "\n" for x in lines + [lines[i] for i in range(20) for _ in range(3)]))
    run, _ = await run_to_end(stack, small_spec(tiny_model, data, hyperparameters={"max_steps": 4}))
    assert run.state == RunState.succeeded.value, run.error

    snap = run.dataset_snapshot
    train, held = stored_rows(stack, snap["train_uri"]), stored_rows(stack, snap["eval_uri"])
    assert len(train) + len(held) == 160 and len(held) == snap["eval_rows"] > 0
    trained = {tuple(r["input_ids"]) for r in train}
    assert [r["line"] for r in held if tuple(r["input_ids"]) in trained] == []
    assert snap["eval_in_train_rows"] == 0 and snap["distinct_rows"] == 100
    assert any("60 rows of copies.jsonl are exact copies" in w and "occurs 4 times" in w
               for w in preflight_warnings(stack, run.id))


async def test_a_run_evaluates_on_its_eval_dataset_less_the_rows_it_trains_on(stack, tiny_model, tmp_path):
    lines = write_demo_dataset(tmp_path / "demo.jsonl", rows=150).read_text().splitlines()
    data, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    data.write_text("".join(x + "\n" for x in lines[:120]))
    valid.write_text("".join(x + "\n" for x in [lines[0]] + lines[120:]))  # line 1 is a training row
    spec = small_spec(tiny_model, data, eval_dataset=str(valid), hyperparameters={"max_steps": 4})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.succeeded.value, run.error

    snap = run.dataset_snapshot
    assert (snap["train_rows"], snap["eval_rows"], snap["eval_excluded_rows"]) == (120, 30, 1)
    assert snap["eval_source"] == "valid.jsonl"
    assert [r["line"] for r in stored_rows(stack, snap["eval_uri"])] == list(range(2, 32))
    assert any("valid.jsonl: 1 of 31 rows (3%) also occur in dataset train.jsonl" in w and "lines 1" in w
               for w in preflight_warnings(stack, run.id))
