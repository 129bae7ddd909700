"""TuneLLM end to end on a real Temporal dev server with real training on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from api.routes.runs import start_run_workflow
from schemas.run_state import RunState
from store.db import new_id
from tests.conftest import small_spec
from workflows.tune_llm import TuneLLM


async def run_to_end(stack, spec):
    run_id = new_id("run")
    stack.db.create_run(run_id, spec)
    handle = await start_run_workflow(stack.client, stack.settings, run_id, spec)
    try:
        await handle.result()
    except WorkflowFailureError:
        pass
    return stack.db.get_run(run_id), handle


async def test_lora_run_learns_and_publishes_a_loadable_adapter(stack, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"])
    run, handle = await run_to_end(stack, spec)

    assert run.state == RunState.succeeded.value, run.error
    assert run.step == run.total_steps == 24
    assert run.tuned_eval_loss < run.baseline_eval_loss

    adapter = Path(run.adapter_path)
    manifest = json.loads((adapter / "lockn-manifest.json").read_text())
    assert manifest["dataset"]["sha256"] == run.dataset_snapshot["sha256"]
    assert manifest["spec_sha256"] == spec.sha256()
    assert manifest["base_model"]["id"] == str(tiny_model)
    assert manifest["seed"] == 0
    assert manifest["packages"]["torch"] and manifest["packages"]["peft"]

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b), "training left LoRA B at zero"

    status = await handle.query(TuneLLM.status)
    assert status.state == RunState.succeeded
    states = [e.state for e in stack.db.events(run.id) if e.kind == "state"]
    assert states == [s.value for s in (
        RunState.queued, RunState.preflight, RunState.preparing_data, RunState.baseline_eval,
        RunState.training, RunState.evaluating, RunState.publishing, RunState.succeeded,
    )]
