"""The demo dataset is deterministic and every line has the shape its loader expects.

Run: python -m pytest tests/activities/test_demo_data.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from activities.demo_data import demo_texts, write_demo_chat_dataset, write_demo_completion_dataset, write_demo_dataset

WRITERS = [write_demo_dataset, write_demo_chat_dataset, write_demo_completion_dataset]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("write", WRITERS)
def test_same_seed_same_bytes(tmp_path: Path, write):
    a = write(tmp_path / "a.jsonl", rows=50, seed=3)
    b = write(tmp_path / "b.jsonl", rows=50, seed=3)
    c = write(tmp_path / "c.jsonl", rows=50, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("write", WRITERS)
def test_row_count_and_default_size(tmp_path: Path, write):
    assert len(read_jsonl(write(tmp_path / "small.jsonl", rows=7))) == 7
    assert len(read_jsonl(write(tmp_path / "nested" / "default.jsonl"))) == 400


def test_instruction_shape(tmp_path: Path):
    rows = read_jsonl(write_demo_dataset(tmp_path / "d.jsonl"))
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"] and row["output"]
    assert any(r["input"] == "" for r in rows) and any(r["input"] for r in rows)
    # The patterns are learnable: the same question always gets the same answer.
    assert {"instruction": "Translate the color to French.", "input": "red", "output": "rouge"} in rows
    answers: dict[tuple[str, str], str] = {}
    for r in rows:
        assert answers.setdefault((r["instruction"], r["input"]), r["output"]) == r["output"]


def test_chat_shape(tmp_path: Path):
    rows = read_jsonl(write_demo_chat_dataset(tmp_path / "d.jsonl"))
    for row in rows:
        assert set(row) == {"messages"}
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(set(m) == {"role", "content"} and m["content"] for m in row["messages"])
    assert any(len(r["messages"]) == 3 for r in rows) and any(len(r["messages"]) == 2 for r in rows)


def test_completion_shape(tmp_path: Path):
    rows = read_jsonl(write_demo_completion_dataset(tmp_path / "d.jsonl"))
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"] and row["completion"]


def test_shapes_carry_the_same_content(tmp_path: Path):
    inst = read_jsonl(write_demo_dataset(tmp_path / "i.jsonl", rows=30))
    chat = read_jsonl(write_demo_chat_dataset(tmp_path / "c.jsonl", rows=30))
    comp = read_jsonl(write_demo_completion_dataset(tmp_path / "p.jsonl", rows=30))
    assert [r["output"] for r in inst] == [r["messages"][-1]["content"] for r in chat] == [r["completion"] for r in comp]


def test_demo_texts_cover_the_dataset():
    texts = demo_texts(rows=40)
    assert texts == demo_texts(rows=40)
    assert all(isinstance(t, str) and t for t in texts)
    assert "Translate the color to French." in texts


@pytest.mark.parametrize("write", WRITERS)
def test_no_row_repeats_so_eval_rows_are_never_training_rows(tmp_path: Path, write):
    from activities.dataset_rows import deterministic_split

    lines = write(tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == len(lines) == 400
    train, held = deterministic_split(len(lines), 0.1, seed=42)
    assert not {lines[i] for i in held} & {lines[i] for i in train}


def test_more_rows_than_the_demo_has_is_refused_plainly(tmp_path: Path):
    with pytest.raises(ValueError, match="distinct rows; ask for at most"):
        write_demo_dataset(tmp_path / "d.jsonl", rows=100_000)
