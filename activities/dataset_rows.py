"""Reading JSONL datasets in the three shapes people bring, row by row, with reasons.

Pure Python (the API imports it to validate uploads): no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.datasets import DatasetReport, DatasetShape, RowProblem

ROLES = ("system", "user", "assistant")
MAX_PROBLEMS = 50
SHAPES_HELP = (
    'each line must be a JSON object such as {"messages": [...]}, '
    '{"instruction": ..., "output": ...} or {"prompt": ..., "completion": ...}'
)
SHAPE_FIELDS = {
    DatasetShape.chat: "messages",
    DatasetShape.instruction: "instruction/input/output",
    DatasetShape.completion: "prompt/completion",
}


@dataclass(frozen=True)
class Example:
    """One usable row, normalised: messages for chat and instruction rows, prompt/completion otherwise."""

    line: int
    shape: DatasetShape
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None


class RowError(ValueError):
    """One bad row: `kind` is the problem class, the message says what to do."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages people read."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _shape_of(row: dict) -> DatasetShape | None:
    if "messages" in row:
        return DatasetShape.chat
    if "instruction" in row:
        return DatasetShape.instruction
    if "prompt" in row or "completion" in row:
        return DatasetShape.completion
    return None


def _text(row: dict, field: str, required: bool = True, allow_empty: bool = False) -> str:
    if row.get(field) is None:
        if required:
            raise RowError("missing_field", f"field {field!r} is missing")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {field!r} must be a string, not {_json_type(value)}")
    if required and not allow_empty and not value.strip():
        raise RowError("empty_value", f"field {field!r} is empty")
    return value


def _chat(row: dict, line: int) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("missing_field", 'messages must be a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(
                "not_object", f"messages[{i}] is {_json_type(m)}; each message must be an object with role and content"
            )
        role = m.get("role")
        if role not in ROLES:
            hint = " (tool messages are not supported yet; leave them out)" if role == "tool" else ""
            raise RowError("wrong_role", f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}{hint}")
        content = m.get("content")
        if content is None:
            raise RowError("missing_field", f"messages[{i}].content is missing; give each message its text")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"messages[{i}].content must be a string, not {_json_type(content)}")
        if not content.strip():
            raise RowError("empty_value", f"messages[{i}].content is empty")
        if role == "system" and i != 0:
            raise RowError("bad_order", f"messages[{i}] is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("bad_order", "no assistant message: there is nothing to learn from this row")
    if out[-1]["role"] != "assistant":
        raise RowError("bad_order", f"the last message is from the {out[-1]['role']}; end with the assistant's answer")
    first = next(i for i, m in enumerate(out) if m["role"] != "system")
    if out[first]["role"] != "user":
        # Chat templates (and the models behind them) expect the user to speak first.
        raise RowError("bad_order", f"messages[{first}] is from the assistant; start the conversation with a user message")
    return Example(line=line, shape=DatasetShape.chat, messages=tuple(out))


def _instruction(row: dict, line: int) -> Example:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    output = _text(row, "output")
    system = _text(row, "system", required=False)
    user = instruction + (f"\n\n{extra}" if extra.strip() else "")
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return Example(line=line, shape=DatasetShape.instruction, messages=tuple(messages))


def _completion(row: dict, line: int) -> Example:
    prompt = _text(row, "prompt", allow_empty=True)
    completion = _text(row, "completion")
    return Example(line=line, shape=DatasetShape.completion, prompt=prompt, completion=completion)


PARSERS = {DatasetShape.chat: _chat, DatasetShape.instruction: _instruction, DatasetShape.completion: _completion}


def _decode(raw: bytes) -> str:
    # NUL bytes are valid UTF-8 but never valid JSONL: they mean UTF-16 (every ASCII char gets a zero byte).
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise RowError("not_utf8", "not UTF-8 text (it looks like UTF-16); save the file as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(
            "not_utf8",
            f"not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8",
        ) from None


def _parse_line(raw: bytes) -> tuple[dict, DatasetShape]:
    """One line as a JSON object with a known shape, or a RowError saying why not."""
    text = _decode(raw.rstrip(b"\r"))  # Windows line endings
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno}); {SHAPES_HELP}") from None
    if not isinstance(row, dict):
        raise RowError("not_object", f"this line is {_json_type(row)}, not an object; {SHAPES_HELP}")
    shape = _shape_of(row)
    if shape is None:
        found = ", ".join(sorted(row)) or "none"
        raise RowError(
            "wrong_shape",
            f"no messages, instruction or prompt/completion field (found: {found}); the accepted shapes are "
            "chat (messages), instruction (instruction, output, optional input and system) "
            "and completion (prompt, completion)",
        )
    return row, shape


def read_dataset(
    path: Path, *, max_bad_row_fraction: float = 0.5, source_name: str | None = None
) -> tuple[list[Example], DatasetReport]:
    """Parse and validate every row of a JSONL file.

    Bad rows are skipped and reported with their line and a reason; the report says
    `refused` (and why) when the file has no rows, no valid row, or more than
    `max_bad_row_fraction` bad rows. `source_name` is the name reports use (default: the file name).
    """
    data = Path(path).read_bytes()
    source = source_name or Path(path).name
    body = data.removeprefix(b"\xef\xbb\xbf")  # editors on Windows add a UTF-8 BOM; it is harmless
    problems: list[RowProblem] = []
    parsed: list[tuple[int, dict, DatasetShape]] = []
    total = 0
    for line, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip():
            continue
        total += 1
        try:
            parsed.append((line, *_parse_line(raw)))
        except RowError as err:
            problems.append(RowProblem(line=line, kind=err.kind, reason=f"line {line}: {err}"))

    # The majority decides the shape; ties go to the shape seen first.
    shape = Counter(s for _, _, s in parsed).most_common(1)[0][0] if parsed else None
    examples: list[Example] = []
    for line, row, row_shape in parsed:
        try:
            if row_shape != shape:
                raise RowError(
                    "wrong_shape",
                    f"this row is a {row_shape.value} row ({SHAPE_FIELDS[row_shape]}) but the dataset is "
                    f"{shape.value} ({SHAPE_FIELDS[shape]}); use one shape per file",
                )
            examples.append(PARSERS[shape](row, line))
        except RowError as err:
            problems.append(RowProblem(line=line, kind=err.kind, reason=f"line {line}: {err}"))
    problems.sort(key=lambda p: p.line)

    bad = len(problems)
    fraction = bad / total if total else 0.0
    counts = dict(Counter(p.kind for p in problems))
    first = "; ".join(p.reason for p in problems[:3])
    by_kind = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if total == 0:
        refused, message = True, f"dataset is empty: {source} has no rows. {SHAPES_HELP[0].upper()}{SHAPES_HELP[1:]}"
    elif not examples:
        refused, message = True, f"no usable rows in {source}: all {total} rows are bad ({by_kind}). First problems: {first}"
    elif fraction > max_bad_row_fraction:
        refused = True
        message = (
            f"{source} is mostly bad: {bad} of {total} rows ({fraction:.0%}; {by_kind}) cannot be used, more than "
            f"the allowed {max_bad_row_fraction:.0%}. First problems: {first}. "
            "Fix those rows, or raise max_bad_row_fraction"
        )
    elif bad:
        refused = False
        message = f"{len(examples)} valid {shape.value} rows; skipped {bad} of {total} rows; see problems. First: {first}"
    else:
        refused, message = False, f"{len(examples)} valid {shape.value} rows"
    report = DatasetReport(
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        shape=shape,
        total_rows=total,
        valid_rows=len(examples),
        bad_rows=bad,
        bad_row_fraction=round(fraction, 4),
        problems=problems[:MAX_PROBLEMS],
        problem_counts=counts,
        refused=refused,
        message=message,
    )
    return examples, report


def split_sizes(n: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) row counts: eval is max(1, round(n * eval_fraction)), keeping at least one train row.

    With fewer than two rows there is nothing to hold out: (n, 0).
    """
    if n < 2:
        return n, 0
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return n - n_eval, n_eval


def deterministic_split(
    n: int, eval_fraction: float, seed: int, keys: Sequence[Hashable] | None = None
) -> tuple[list[int], list[int]]:
    """Train and eval row indices (each sorted), sized as split_sizes says.

    The same (n, eval_fraction, seed, keys) always gives the same split: it comes from a
    permutation drawn by random.Random(seed), never from the global RNG or row order.
    Rows with equal `keys` (exact duplicates) land on the same side: whole groups are shuffled
    and taken into eval while they fit, so eval stays within a group's size of its target.
    With all keys distinct (or none given) the split is the plain row shuffle.
    """
    _, n_eval = split_sizes(n, eval_fraction)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys if keys is not None else range(n)):
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # shuffling n singletons draws the same permutation as shuffling range(n)
    held: list[int] = []
    for group in order:
        if len(held) + len(group) <= n_eval:
            held += group
            if len(held) == n_eval:
                break
    if not held and n_eval and len(order) > 1:
        held = list(min(order, key=len))  # every group is bigger than the target: hold out the smallest
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], sorted(held)


@dataclass(frozen=True)
class Duplicates:
    """How often rows repeat: `most_repeated` lists (first line, occurrences), most repeated first."""

    rows: int
    distinct: int
    most_repeated: list[tuple[int, int]]

    @property
    def repeats(self) -> int:
        """Rows that repeat an earlier row exactly."""
        return self.rows - self.distinct


def count_duplicates(lines: Sequence[int], keys: Sequence[Hashable], listed: int = 5) -> Duplicates:
    """Distinct rows among `keys` and the most repeated ones, named by the line of their first occurrence."""
    first: dict[Hashable, int] = {}
    counts: Counter = Counter()
    for line, key in zip(lines, keys):
        first.setdefault(key, line)
        counts[key] += 1
    repeated = sorted(((first[k], c) for k, c in counts.items() if c > 1), key=lambda lc: (-lc[1], lc[0]))
    return Duplicates(rows=len(keys), distinct=len(counts), most_repeated=repeated[:listed])


def occurring_in(reference: Iterable[Hashable], keys: Sequence[Hashable | None]) -> list[int]:
    """Indices of `keys` that also occur in `reference` (None never matches)."""
    seen = set(reference)
    seen.discard(None)
    return [i for i, key in enumerate(keys) if key in seen]


@dataclass(frozen=True)
class Split:
    """Which rows train and which evaluate. `eval` indexes the eval file's rows when there is one,
    else the dataset's own; `excluded` are eval-file rows left out as copies of training rows."""

    train: list[int]
    eval: list[int]
    excluded: list[int]
    eval_in_train: int  # eval rows whose exact copy trains (0 unless something is wrong)
    eval_prompt_in_train: int  # eval rows whose prompt trains with another answer


def split_rows(
    keys: Sequence[Hashable],
    prompt_keys: Sequence[Hashable | None],
    eval_fraction: float,
    seed: int,
    eval_keys: Sequence[Hashable] | None = None,
    eval_prompt_keys: Sequence[Hashable | None] | None = None,
) -> Split:
    """The train/eval split of a run, from each row's content key (equal keys: exact duplicates).

    Without an eval file, eval_fraction of the rows are held out, copies together
    (deterministic_split). With one, every dataset row trains and the eval file's rows
    evaluate, less those that also occur in the dataset. The overlap figures are measured on
    the result, not assumed.
    """
    if eval_keys is None:
        train, held = deterministic_split(len(keys), eval_fraction, seed, keys)
        excluded: list[int] = []
        eval_keys, eval_prompt_keys = keys, prompt_keys
    else:
        train = list(range(len(keys)))
        excluded = occurring_in(keys, eval_keys)
        dropped = set(excluded)
        held = [i for i in range(len(eval_keys)) if i not in dropped]
    train_keys = [keys[i] for i in train]
    in_train = occurring_in(train_keys, [eval_keys[i] for i in held])
    copies = {eval_keys[held[i]] for i in in_train}
    # A near-duplicate shares the prompt with a train row but is not an exact copy of one.
    near = occurring_in(
        [prompt_keys[i] for i in train],
        [eval_prompt_keys[i] if eval_keys[i] not in copies else None for i in held],
    )
    return Split(train=train, eval=held, excluded=excluded, eval_in_train=len(in_train), eval_prompt_in_train=len(near))
