"""A chunk trains in the precision its plan was made for, or refuses: never silently in another.

    python -m pytest tests/worker_gpu/test_precision.py -q
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from activities.preflight import preflight_report
from activities.snapshot import snapshot_dataset
from schemas.hardware import HardwareInfo, training_precision
from schemas.run_spec import RunSpec
from store.artifacts import LocalArtifactStore
from worker_gpu.model_loading import PrecisionUnavailable, load_base_model
from worker_gpu.recipe_lora import LoraRecipe, eval_loss

ROOTS = (Path(tempfile.gettempdir()).resolve(),)
CPU = {"device": "cpu", "cpu_count": 2, "memory_available_bytes": 16 * 2**30, "bitsandbytes_usable": True, "disk_free_bytes": 2**40}


@pytest.fixture
def planned(tiny_model, datasets, tmp_path):
    spec = RunSpec.model_validate({
        "base_model": str(tiny_model), "dataset": str(datasets["instruction"]),
        "hyperparameters": {"max_steps": 2, "max_seq_len": 96, "micro_batch_size": 4, "grad_accum": 1, "lora_r": 4},
    })
    report = preflight_report("run_precision", spec, db=None, store=None, hardware=HardwareInfo(**CPU), roots=ROOTS)
    assert report.ok, report.errors
    store = LocalArtifactStore(tmp_path / "store")
    snap = snapshot_dataset(report.plan, None, store, roots=ROOTS)
    rows = [json.loads(x) for x in store.local_file(snap.train_uri).read_text().splitlines()]
    return report.plan, rows


def test_one_rule_for_the_precision_of_a_worker():
    assert training_precision("cuda", True) == "bfloat16"
    assert training_precision("cuda", False) == training_precision("cpu", True) == training_precision(None, None) == "float32"
    gpu = HardwareInfo(device="cuda", bf16_supported=True, cpu_count=8, disk_free_bytes=1)
    assert gpu.precision == "bfloat16"


def test_a_float32_plan_trains_in_float32(planned):
    plan, rows = planned
    assert plan.precision == "float32"  # planned for a CPU worker
    recipe = LoraRecipe(plan, rows, torch.device("cpu"))
    recipe.setup(None)
    assert recipe.dtype == torch.float32
    assert {p.dtype for p in recipe.model.parameters()} == {torch.float32}
    recipe.train(1, lambda step, loss: False)
    assert recipe.step == 1
    loss, tokens = eval_loss(recipe.model, rows[:4], 4, recipe.device, recipe.dtype)
    assert tokens > 0 and loss > 0


def test_a_bfloat16_plan_on_a_worker_without_bfloat16_refuses_instead_of_training_in_float32(planned):
    plan, rows = planned
    gpu_plan = plan.model_copy(update={"precision": "bfloat16"})  # made for a bf16 GPU, retried here
    with pytest.raises(PrecisionUnavailable, match=r"plan trains in bfloat16, but this worker \(cpu\) trains in float32"):
        LoraRecipe(gpu_plan, rows, torch.device("cpu"))
    with pytest.raises(PrecisionUnavailable):
        load_base_model(gpu_plan, torch.device("cpu"))
