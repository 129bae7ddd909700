"""snapshot_dataset: an immutable, tokenized copy of the dataset with a deterministic split.

Idempotent: the snapshot's keys derive from the run id, and rewriting them gives the
same bytes, so a retried activity converges on the same snapshot.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from activities.base_model import load_tokenizer
from activities.dataset_render import IGNORE, prompt_and_reference, render_example, render_text
from activities.dataset_rows import read_dataset, split_rows
from activities.errors import user_error
from activities.preflight import resolve_dataset_path
from schemas.activities import DatasetSnapshot, TokenStats, TrainingPlan
from schemas.datasets import TokenLengths
from store.artifacts import ArtifactStore
from store.layout import dataset_key, snapshot_key


def snapshot_dataset(plan: TrainingPlan, db, store: ArtifactStore, *, roots: Sequence[Path] = ()) -> DatasetSnapshot:
    """Validate, split and tokenize the dataset (and the eval_dataset, when the spec has one)
    exactly as preflight planned: copies of a row stay on one side of the split, eval-file
    rows that also occur in the dataset are left out. `roots`: where local files may be."""
    spec = plan.spec
    path, source = resolve_dataset_path(spec.dataset, db, store, roots=roots)
    examples, report = read_dataset(path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=source)
    _same_bytes("dataset", source, plan.dataset_sha256, report.sha256)
    if report.refused:
        raise user_error(report.message)
    source_key = dataset_key(report.sha256)
    if not store.exists(source_key):
        store.put_file(source_key, path)
    eval_examples, eval_report, eval_source_key = None, None, None
    if spec.eval_dataset:
        eval_path, eval_source = resolve_dataset_path(spec.eval_dataset, db, store, roots=roots, field="eval_dataset")
        eval_examples, eval_report = read_dataset(
            eval_path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=eval_source
        )
        _same_bytes("eval_dataset", eval_source, plan.eval_dataset_sha256, eval_report.sha256)
        if eval_report.refused:
            raise user_error(f"eval_dataset: {eval_report.message}")
        eval_source_key = dataset_key(eval_report.sha256)
        if not store.exists(eval_source_key):
            store.put_file(eval_source_key, eval_path)

    tokenizer = load_tokenizer(plan.base_model_path)
    rendered = [render_text(e, tokenizer) for e in examples]
    eval_rendered = [render_text(e, tokenizer) for e in eval_examples] if eval_examples is not None else None
    split = split_rows(
        [r.key for r in rendered], [r.prompt_key for r in rendered], spec.eval_fraction, plan.hp.seed,
        [r.key for r in eval_rendered] if eval_rendered is not None else None,
        [r.prompt_key for r in eval_rendered] if eval_rendered is not None else None,
    )
    if eval_examples is not None and not split.eval:
        raise user_error(
            f"every row of eval_dataset {eval_report.source} also occurs in dataset {source}: "
            "give eval rows that are not in the training file, or leave eval_dataset out"
        )
    lengths, truncated, trained_tokens, answer_lost = [], 0, 0, 0
    train_rows, eval_rows = [], []
    for i in split.train:
        r = render_example(examples[i], tokenizer, plan.max_seq_len, rendered[i])
        lengths.append(r.length_before_truncation)
        truncated += r.truncated
        answer_lost += r.answer_kept_share == 0
        trained_tokens += sum(1 for t in r.labels if t != IGNORE)
        train_rows.append({"line": examples[i].line, "input_ids": r.input_ids, "labels": r.labels})
    held, held_rendered = (eval_examples, eval_rendered) if eval_examples is not None else (examples, rendered)
    for i in split.eval:
        r = render_example(held[i], tokenizer, plan.max_seq_len, held_rendered[i])
        prompt, reference = prompt_and_reference(held[i], tokenizer)
        eval_rows.append(
            {"line": held[i].line, "input_ids": r.input_ids, "labels": r.labels, "prompt": prompt, "reference": reference}
        )
    if trained_tokens == 0:
        raise user_error(
            f"no train row of {source} has any answer tokens left after truncation to max_seq_len "
            f"{plan.max_seq_len}; raise max_seq_len or shorten the prompts"
        )

    train_key, eval_key = snapshot_key(plan.run_id, "train"), snapshot_key(plan.run_id, "eval")
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
        _write_jsonl(train_file, train_rows)
        _write_jsonl(eval_file, eval_rows)
        train_sha = store.put_file(train_key, train_file)
        eval_sha = store.put_file(eval_key, eval_file)

    stats = TokenStats(
        **TokenLengths.of(lengths).model_dump(),
        truncated_rows=truncated,
        truncated_share=round(truncated / len(lengths), 4),
        trained_tokens=trained_tokens,
        answer_lost_rows=answer_lost,
    )
    return DatasetSnapshot(
        sha256=report.sha256,
        source_uri=store.uri(source_key),
        train_uri=train_key,
        train_sha256=train_sha,
        eval_uri=eval_key,
        eval_sha256=eval_sha,
        shape=report.shape.value,
        total_rows=report.total_rows,
        bad_rows=report.bad_rows,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        token_stats=stats,
        report=report.model_dump(mode="json"),
        distinct_rows=len({r.key for r in rendered}),
        eval_source=eval_report.source if eval_report else None,
        eval_source_sha256=eval_report.sha256 if eval_report else None,
        eval_source_uri=store.uri(eval_source_key) if eval_source_key else None,
        eval_excluded_rows=len(split.excluded),
        eval_in_train_rows=split.eval_in_train,
        eval_in_train_share=round(split.eval_in_train / len(eval_rows), 4) if eval_rows else 0.0,
        eval_prompt_in_train_rows=split.eval_prompt_in_train,
    )


def _same_bytes(field: str, source: str, planned: str | None, found: str) -> None:
    """The snapshot is of the rows the plan counted (its steps, split and memory), or nothing.
    Plans made before they named their dataset (None) are not checked."""
    if planned is not None and found != planned:
        raise user_error(
            f"{field} {source} changed after preflight planned the run (sha256 {planned[:12]}... then, "
            f"{found[:12]}... now): the plan's steps and split were computed from other rows. Start the run "
            "again, or upload the file and name it by its dataset id so it cannot change"
        )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
