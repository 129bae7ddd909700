"""snapshot_dataset: an immutable, tokenized copy of the dataset with a deterministic split.

Idempotent: the snapshot's keys derive from the run id, and rewriting them gives the
same bytes, so a retried activity converges on the same snapshot.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from activities.dataset_render import prompt_and_reference, render_example
from activities.dataset_rows import deterministic_split, read_dataset
from activities.errors import user_error
from activities.preflight import resolve_dataset_path
from schemas.activities import DatasetSnapshot, TokenStats, TrainingPlan
from store.artifacts import ArtifactStore


def snapshot_dataset(plan: TrainingPlan, db, store: ArtifactStore) -> DatasetSnapshot:
    from worker_gpu.model_loading import load_tokenizer

    spec = plan.spec
    path, source = resolve_dataset_path(spec.dataset, db, store)
    examples, report = read_dataset(path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=source)
    if report.refused:
        raise user_error(report.message)
    source_key = f"datasets/sha256/{report.sha256}.jsonl"
    if not store.exists(source_key):
        store.put_file(source_key, path)

    tokenizer = load_tokenizer(plan.base_model_path)
    train_idx, eval_idx = deterministic_split(len(examples), spec.eval_fraction, plan.hp.seed)
    lengths, truncated, trained_tokens = [], 0, 0
    train_rows, eval_rows = [], []
    for i in train_idx:
        r = render_example(examples[i], tokenizer, plan.max_seq_len)
        lengths.append(r.length_before_truncation)
        truncated += r.truncated
        trained_tokens += sum(1 for t in r.labels if t != -100)
        train_rows.append({"line": examples[i].line, "input_ids": r.input_ids, "labels": r.labels})
    for i in eval_idx:
        r = render_example(examples[i], tokenizer, plan.max_seq_len)
        prompt, reference = prompt_and_reference(examples[i], tokenizer)
        eval_rows.append(
            {"line": examples[i].line, "input_ids": r.input_ids, "labels": r.labels, "prompt": prompt, "reference": reference}
        )
    if trained_tokens == 0:
        raise user_error(
            f"no train row of {source} has any answer tokens left after truncation to max_seq_len "
            f"{plan.max_seq_len}; raise max_seq_len or shorten the prompts"
        )

    prefix = f"runs/{plan.run_id}/data"
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
        _write_jsonl(train_file, train_rows)
        _write_jsonl(eval_file, eval_rows)
        train_sha = store.put_file(f"{prefix}/train.jsonl", train_file)
        eval_sha = store.put_file(f"{prefix}/eval.jsonl", eval_file)

    ordered = sorted(lengths)
    stats = TokenStats(
        min=ordered[0],
        max=ordered[-1],
        mean=round(sum(ordered) / len(ordered), 2),
        p50=ordered[len(ordered) // 2],
        p95=ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        truncated_rows=truncated,
        truncated_share=round(truncated / len(ordered), 4),
        trained_tokens=trained_tokens,
    )
    return DatasetSnapshot(
        sha256=report.sha256,
        source_uri=store.uri(source_key),
        train_uri=f"{prefix}/train.jsonl",
        train_sha256=train_sha,
        eval_uri=f"{prefix}/eval.jsonl",
        eval_sha256=eval_sha,
        shape=report.shape.value,
        total_rows=report.total_rows,
        bad_rows=report.bad_rows,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        token_stats=stats,
        report=report.model_dump(mode="json"),
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
