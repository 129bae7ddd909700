"""A real plan and its tokenized rows for recipe-level tests: preflight and the snapshot run on
the tiny model and the instruction dataset, exactly as a run would make them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from activities.preflight import preflight_report
from activities.snapshot import snapshot_dataset
from schemas.activities import TrainingPlan
from schemas.hardware import HardwareInfo
from schemas.run_spec import RunSpec
from store.artifacts import LocalArtifactStore

ROOTS = (Path(tempfile.gettempdir()).resolve(),)
CPU = HardwareInfo(
    device="cpu", cpu_count=2, memory_available_bytes=16 * 2**30, bitsandbytes_usable=True, disk_free_bytes=2**40
)
CPU_DEVICE = torch.device("cpu")
# Four steps of two micro-batches of two rows: chunks, accumulation and resume in seconds.
SMALL = {"max_steps": 4, "max_seq_len": 96, "micro_batch_size": 2, "grad_accum": 2, "lora_r": 4}


def plan_and_rows(
    run_id: str, tiny_model: Path, dataset: Path, store_dir: Path, **hyperparameters
) -> tuple[TrainingPlan, list[dict], list[dict]]:
    """The plan preflight makes for SMALL (updated by `hyperparameters`), and the snapshot's
    train and eval rows."""
    spec = RunSpec.model_validate({
        "base_model": str(tiny_model), "dataset": str(dataset), "eval_at_checkpoints": True,
        "hyperparameters": {**SMALL, **hyperparameters},
    })
    report = preflight_report(run_id, spec, db=None, store=None, hardware=CPU, roots=ROOTS)
    assert report.ok, report.errors
    store = LocalArtifactStore(store_dir)
    snap = snapshot_dataset(report.plan, None, store, roots=ROOTS)

    def read(key: str) -> list[dict]:
        return [json.loads(line) for line in store.local_file(key).read_text().splitlines()]

    return report.plan, read(snap.train_uri), read(snap.eval_uri)
