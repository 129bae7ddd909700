"""Reading JSONL datasets: shapes, every defect with its line, refusal vs skip, the split.

Run: python -m pytest tests/activities/test_dataset_rows.py -q
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from activities.dataset_rows import (
    count_duplicates,
    deterministic_split,
    read_dataset,
    split_rows,
    split_sizes,
)
from schemas.datasets import DatasetShape

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
INSTRUCTION = {"instruction": "Add.", "output": "4"}
COMPLETION = {"prompt": "2+2=", "completion": "4"}


def write(tmp_path, lines, name="data.jsonl"):
    """Write one line per item: str and bytes as they are, anything else as JSON."""
    path = tmp_path / name
    raw = [x if isinstance(x, bytes) else x.encode() if isinstance(x, str) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def only_problem(report):
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_chat_rows(tmp_path):
    row = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"], {"role": "user", "content": "More?"},
                        {"role": "assistant", "content": "No."}], "id": 7}
    path = write(tmp_path, [CHAT, row])
    examples, report = read_dataset(path)
    assert report.shape == DatasetShape.chat and not report.refused
    assert (report.total_rows, report.valid_rows, report.bad_rows) == (2, 2, 0)
    assert report.message == "2 valid chat rows"
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and report.size_bytes == path.stat().st_size
    assert report.source == "data.jsonl"
    assert examples[0].messages == tuple(CHAT["messages"]) and examples[0].line == 1
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_instruction_rows_become_messages(tmp_path):
    rows = [
        INSTRUCTION,
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "You translate."},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
    ]
    examples, report = read_dataset(write(tmp_path, rows), source_name="mine.jsonl")
    assert report.shape == DatasetShape.instruction and report.valid_rows == 3 and report.source == "mine.jsonl"
    assert examples[0].messages == ({"role": "user", "content": "Add."}, {"role": "assistant", "content": "4"})
    assert examples[1].messages == (
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate.\n\nBonjour"},
        {"role": "assistant", "content": "Hello"},
    )
    assert examples[2].messages[0] == {"role": "user", "content": "Say hi."}


def test_completion_rows(tmp_path):
    examples, report = read_dataset(write(tmp_path, [COMPLETION, {"prompt": "", "completion": "Once upon a time"}]))
    assert report.shape == DatasetShape.completion and report.valid_rows == 2
    assert (examples[0].prompt, examples[0].completion, examples[0].messages) == ("2+2=", "4", None)


def test_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(COMPLETION).encode() + b"\r\n\r\n   \n" + b"{oops\r\n")
    examples, report = read_dataset(path)
    assert report.total_rows == 2 and report.valid_rows == 1
    assert examples[0].line == 1
    # blank lines count for line numbers
    assert only_problem(report).line == 4


def test_invalid_json_names_line_and_column(tmp_path):
    _, report = read_dataset(write(tmp_path, [INSTRUCTION, INSTRUCTION, '{"instruction": "x" "output": "y"}'] + [INSTRUCTION] * 3))
    p = only_problem(report)
    assert p.line == 3 and p.kind == "invalid_json"
    assert p.reason.startswith("line 3: not valid JSON (Expecting ',' delimiter at column 21)")
    assert "each line must be a JSON object" in p.reason
    assert report.problem_counts == {"invalid_json": 1}


@pytest.mark.parametrize(
    "row, kind, words",
    [
        ({"instruction": "Do it."}, "missing_field", "field 'output' is missing"),
        ({"instruction": "  ", "output": "x"}, "empty_value", "field 'instruction' is empty"),
        ({"instruction": "x", "output": 3}, "wrong_type", "field 'output' must be a string, not a number"),
        ({"instruction": "x", "output": "y", "input": ["a"]}, "wrong_type", "field 'input' must be a string"),
        ({"text": "hello"}, "wrong_shape", "found: text"),
        ("null", "not_object", "this line is null, not an object"),
        ([1, 2], "not_object", "this line is a list, not an object"),
        ("42", "not_object", "this line is a number, not an object"),
    ],
)
def test_row_defects_name_the_line(tmp_path, row, kind, words):
    lines = [INSTRUCTION] * 4 + [row] + [INSTRUCTION]
    examples, report = read_dataset(write(tmp_path, lines))
    p = only_problem(report)
    assert (p.line, p.kind) == (5, kind) and p.reason.startswith("line 5: ") and words in p.reason, p.reason
    assert len(examples) == 5 and not report.refused and report.problem_counts == {kind: 1}


def test_wrong_shape_lists_the_accepted_shapes(tmp_path):
    _, report = read_dataset(write(tmp_path, [COMPLETION, {"question": "q", "answer": "a"}, COMPLETION]))
    reason = only_problem(report).reason
    for field in ("messages", "instruction", "output", "prompt", "completion"):
        assert field in reason


@pytest.mark.parametrize(
    "messages, kind, words",
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "wrong_role",
         "messages[1].role is 'bot'; use one of system, user, assistant"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}],
         "wrong_role", "tool messages are not supported"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "bad_order", "the last message is from the user; end with the assistant's answer"),
        ([{"role": "user", "content": "a"}], "bad_order", "no assistant message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
         "bad_order", "messages[1] is a system message; only the first"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty_value", "messages[1].content is empty"),
        ([{"role": "user"}, {"role": "assistant", "content": "b"}], "missing_field", "messages[0].content is missing"),
        ([{"role": "user", "content": "a"}, "hi"], "not_object", "messages[1] is a string"),
        ([], "missing_field", "messages must be a non-empty list"),
    ],
)
def test_chat_defects(tmp_path, messages, kind, words):
    examples, report = read_dataset(write(tmp_path, [CHAT, CHAT, {"messages": messages}, CHAT]))
    p = only_problem(report)
    assert (p.line, p.kind) == (3, kind) and p.reason.startswith("line 3: ") and words in p.reason, p.reason
    assert [e.line for e in examples] == [1, 2, 4]


def test_mixed_shapes_follow_the_majority(tmp_path):
    _, report = read_dataset(write(tmp_path, [CHAT, CHAT, CHAT, CHAT, CHAT, CHAT, COMPLETION, CHAT]))
    assert report.shape == DatasetShape.chat
    p = only_problem(report)
    assert p.kind == "wrong_shape"
    assert p.reason == (
        "line 7: this row is a completion row (prompt/completion) but the dataset is chat (messages); "
        "use one shape per file"
    )


def test_non_utf8_line(tmp_path):
    latin1 = json.dumps({"prompt": "Caf\u00e9 ", "completion": "ouvert"}, ensure_ascii=False).encode("latin-1")
    _, report = read_dataset(write(tmp_path, [COMPLETION] * 4 + [latin1] + [COMPLETION]))
    p = only_problem(report)
    assert (p.line, p.kind) == (5, "not_utf8")
    assert p.reason == "line 5: not UTF-8 text (invalid byte 0xe9 at column 16); save the file as UTF-8"
    assert not report.refused and report.valid_rows == 5


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_whole_file_not_utf8_is_refused(tmp_path, encoding):
    rows = [{"prompt": f"R\u00e9sum\u00e9 {i}", "completion": "\u00e0 bient\u00f4t"} for i in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(encoding))
    examples, report = read_dataset(path)
    assert examples == [] and report.refused and report.shape is None
    assert report.problem_counts == {"not_utf8": 3} and report.total_rows == 3
    assert "no usable rows in d.jsonl" in report.message and "save the file as UTF-8" in report.message
    if encoding == "utf-16":
        assert "looks like UTF-16" in report.problems[0].reason


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\r\n  ", b"\xef\xbb\xbf"])
def test_empty_or_whitespace_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    examples, report = read_dataset(path)
    assert examples == [] and report.refused and report.total_rows == 0 and report.bad_row_fraction == 0
    assert report.message.startswith("dataset is empty: empty.jsonl has no rows. Each line must be a JSON object such as")


def test_mostly_bad_is_refused_with_the_first_problems(tmp_path):
    lines = [COMPLETION, COMPLETION] + ["not json"] * 3 + [{"prompt": "x"}]
    path = write(tmp_path, lines)
    examples, report = read_dataset(path)
    assert report.refused and (report.bad_rows, report.total_rows, report.valid_rows) == (4, 6, 2)
    assert report.bad_row_fraction == pytest.approx(4 / 6, abs=1e-4)
    assert report.problem_counts == {"invalid_json": 3, "missing_field": 1}
    assert "4 of 6 rows (67%" in report.message and "line 3: not valid JSON" in report.message
    assert "raise max_bad_row_fraction" in report.message
    # the same file is accepted when the user allows more bad rows
    _, relaxed = read_dataset(path, max_bad_row_fraction=0.7)
    assert not relaxed.refused and relaxed.valid_rows == 2


def test_a_few_bad_rows_are_skipped_and_reported(tmp_path):
    lines = [INSTRUCTION] * 117 + ["{", {"instruction": "x"}, [1]]
    examples, report = read_dataset(write(tmp_path, lines))
    assert len(examples) == 117 and not report.refused
    assert "skipped 3 of 120 rows; see problems" in report.message
    assert [p.line for p in report.problems] == [118, 119, 120]


def test_problems_list_is_capped_but_counts_are_not(tmp_path):
    _, report = read_dataset(write(tmp_path, [COMPLETION] * 100 + ["x"] * 60), max_bad_row_fraction=0.9)
    assert len(report.problems) == 50 and report.problems[0].line == 101
    assert report.bad_rows == 60 and report.problem_counts == {"invalid_json": 60}


def test_all_rows_bad_is_refused_even_if_allowed(tmp_path):
    _, report = read_dataset(write(tmp_path, ["x", "y"]), max_bad_row_fraction=1.0)
    assert report.refused and "no usable rows" in report.message


def test_split_is_deterministic_and_sized():
    train, evaluation = deterministic_split(100, 0.1, seed=3)
    assert (train, evaluation) == deterministic_split(100, 0.1, seed=3)
    assert evaluation != deterministic_split(100, 0.1, seed=4)[1]
    assert len(evaluation) == 10 and sorted(train + evaluation) == list(range(100))
    assert evaluation != list(range(90, 100))  # a shuffle, not the tail of the file
    for n, fraction, expected in [(100, 0.1, (90, 10)), (10, 0.01, (9, 1)), (2, 0.9, (1, 1)), (5, 0.0, (4, 1)),
                                  (3, 1.0, (1, 2)), (1, 0.5, (1, 0)), (0, 0.5, (0, 0))]:
        assert split_sizes(n, fraction) == expected
        tr, ev = deterministic_split(n, fraction, seed=0)
        assert (len(tr), len(ev)) == expected


def test_copies_never_straddle_the_split():
    # 300 rows: 60 distinct rows once each, and 40 rows copied 3 to 12 times.
    keys = [f"once{i}" for i in range(60)] + [f"copy{i % 40}" for i in range(240)]
    for seed in range(20):
        train, held = deterministic_split(len(keys), 0.1, seed, keys)
        assert sorted(train + held) == list(range(300))
        assert not {keys[i] for i in train} & {keys[i] for i in held}, f"seed {seed}: a copy on both sides"
        assert abs(len(held) - 30) <= 5, len(held)  # within a group's size of 10%
        assert (train, held) == deterministic_split(len(keys), 0.1, seed, keys)
    assert deterministic_split(300, 0.1, 1, keys)[1] != deterministic_split(300, 0.1, 2, keys)[1]


def test_distinct_keys_split_exactly_as_before():
    # Runs on datasets without copies keep the split they always had.
    for n, seed in [(100, 3), (57, 0), (1000, 42)]:
        assert deterministic_split(n, 0.1, seed, [f"row{i}" for i in range(n)]) == deterministic_split(n, 0.1, seed)


def test_groups_bigger_than_the_target_still_leave_an_eval_side():
    keys = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    train, held = deterministic_split(100, 0.1, 0, keys)
    assert [keys[i] for i in held] == ["c"] * 20 and len(train) == 80
    assert deterministic_split(10, 0.1, 0, ["same"] * 10) == (list(range(10)), [])


def test_duplicates_are_counted_with_their_multiplicity():
    dup = count_duplicates([1, 2, 3, 4, 5, 6], ["x", "y", "x", "x", "z", "y"])
    assert (dup.rows, dup.distinct, dup.repeats) == (6, 3, 3)
    assert dup.most_repeated == [(1, 3), (2, 2)]


def test_eval_file_rows_that_train_are_left_out():
    train_keys = ["a", "b", "c", "d"]
    split = split_rows(train_keys, ["pa", "pb", "pc", "pd"], 0.1, 0, ["b", "e", "f", "d"], ["pb", "pe", "pa", "pd"])
    assert split.train == [0, 1, 2, 3]
    assert split.excluded == [0, 3] and split.eval == [1, 2]
    assert split.eval_in_train == 0
    assert split.eval_prompt_in_train == 1  # "f" asks what "a" asks, with another answer


def test_held_out_split_measures_its_own_overlap():
    keys = [f"r{i}" for i in range(40)] + ["r0"] * 5
    prompts = [f"p{i % 20}" for i in range(40)] + ["p0"] * 5  # every prompt asked twice, with two answers
    split = split_rows(keys, prompts, 0.2, 0)
    assert split.eval_in_train == 0 and split.excluded == []
    held_prompts = {prompts[i] for i in split.eval}
    train_prompts = {prompts[i] for i in split.train}
    assert split.eval_prompt_in_train == sum(1 for i in split.eval if prompts[i] in train_prompts) > 0
    assert held_prompts


def test_module_stays_light():
    code = "import sys, activities.dataset_rows, activities.dataset_render; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_chat_must_start_with_the_user(tmp_path):
    from activities.dataset_rows import read_dataset

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}]}\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    examples, report = read_dataset(path)
    assert len(examples) == 1
    assert report.problems[0].reason == "line 1: messages[1] is from the assistant; start the conversation with a user message"
