"""A chunk of the LoRA recipe end to end: set up, train, save into staging, eval; a chunk resumed
from that staging directory continues bit for bit; injected faults come in through the hooks.

    python -m pytest tests/worker_gpu/test_recipe_chunk.py -q
"""

from __future__ import annotations

import json

import pytest

from schemas.settings import Settings
from store.layout import CHECKPOINT_ADAPTER_DIR, CHECKPOINT_CURSOR_FILE, CHECKPOINT_STATE_FILE
from tests.worker_gpu.planned import CPU_DEVICE, plan_and_rows
from worker_gpu import faults
from worker_gpu.recipe_lora import (
    CHECKPOINT_EVAL_MIN_ROWS,
    LoraRecipe,
    StepOutOfMemory,
    checkpoint_eval_rows,
    eval_loss,
)


@pytest.fixture
def planned(tiny_model, datasets, tmp_path):
    return plan_and_rows("run_chunk", tiny_model, datasets["instruction"], tmp_path / "store")


def test_a_chunk_resumed_from_its_staging_directory_continues_bit_for_bit(planned, tmp_path):
    plan, rows, evals = planned
    straight = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 4, tmp_path / "straight", eval_rows=lambda: evals)

    seen = []
    first = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(
        None, 0, 2, tmp_path / "first", eval_rows=lambda: evals,
        started=lambda step: seen.append(("started", step)), after_step=lambda step, loss: seen.append(step) or False,
    )
    assert seen == [("started", 0), 1, 2]
    assert (first.step, first.resumed_from, len(first.losses)) == (2, 0, 2)
    for name in (CHECKPOINT_ADAPTER_DIR, CHECKPOINT_STATE_FILE, CHECKPOINT_CURSOR_FILE):
        assert (first.staging_dir / name).exists()
    assert first.eval_loss is not None and first.eval_loss > 0

    second = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(first.staging_dir, 2, 4, tmp_path / "second", eval_rows=lambda: evals)
    assert (second.step, second.resumed_from) == (4, 2)
    assert first.losses + second.losses == straight.losses
    assert second.eval_loss == straight.eval_loss
    weights = "adapter_model.safetensors"
    assert (second.staging_dir / CHECKPOINT_ADAPTER_DIR / weights).read_bytes() == (
        straight.staging_dir / CHECKPOINT_ADAPTER_DIR / weights
    ).read_bytes()


def test_a_chunk_stopped_by_after_step_saves_the_step_it_reached(planned, tmp_path):
    plan, rows, evals = planned
    chunk = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(
        None, 0, 4, tmp_path / "out", eval_rows=lambda: evals, after_step=lambda step, loss: step == 1
    )
    assert chunk.step == 1 and len(chunk.losses) == 1
    assert json.loads((chunk.staging_dir / CHECKPOINT_CURSOR_FILE).read_text())["step"] == 1


def test_the_injected_oom_fails_the_step_and_names_the_batch_shape(planned, tmp_path):
    plan, rows, evals = planned
    assert faults.injected_oom(Settings(faults=""), plan.micro_batch_size) is None
    assert faults.injected_oom(Settings(faults=f"oom_above={plan.micro_batch_size}"), plan.micro_batch_size) is None
    hook = faults.injected_oom(Settings(faults="oom_above=1"), plan.micro_batch_size)
    recipe = LoraRecipe(plan, rows, CPU_DEVICE)
    with pytest.raises(StepOutOfMemory, match=r"out of memory at micro-batch 2 \(max_seq_len 96\): injected"):
        recipe.run_chunk(None, 0, 4, tmp_path / "out", eval_rows=lambda: evals, before_step=hook)
    assert recipe.step == 0 and not (tmp_path / "out").exists()


def test_checkpoints_measure_the_same_few_eval_rows_and_the_last_step_measures_them_all(planned, tmp_path):
    plan, rows, evals = planned
    # One step per chunk: the eval budget (a share of a chunk's training tokens) is below the floor.
    plan = plan.model_copy(update={"spec": plan.spec.model_copy(update={"checkpoint_every_steps": 1})})
    k = checkpoint_eval_rows(evals, rows, plan)
    assert k == CHECKPOINT_EVAL_MIN_ROWS < len(evals)

    first = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 2, tmp_path / "first", eval_rows=lambda: evals)
    assert first.eval_rows == k and first.final_eval_loss is None
    recipe = LoraRecipe(plan, rows, CPU_DEVICE)
    last = recipe.run_chunk(first.staging_dir, 2, plan.total_steps, tmp_path / "last", eval_rows=lambda: evals)
    assert last.eval_rows == k

    measure = lambda part: eval_loss(  # noqa: E731
        recipe.model, part, plan.micro_batch_size, CPU_DEVICE, recipe.dtype, batching=plan.batching, max_seq_len=plan.max_seq_len
    )
    assert last.eval_loss == measure(evals[:k])[0]
    whole, tokens = measure(evals)
    assert last.final_eval_tokens == tokens
    assert last.final_eval_loss == pytest.approx(whole, rel=1e-6)
