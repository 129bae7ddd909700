"""TuneLLM end to end on a real Temporal dev server with real training on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from api.routes.runs import start_run_workflow
from schemas.activities import TrainingPlan
from schemas.run_state import RunState
from store.tables import new_id
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


def adapter_dir(stack, run, tmp_path: Path) -> Path:
    """The published adapter as a directory: where it is on a local store, downloaded from S3."""
    if run.adapter_path:
        return Path(run.adapter_path)
    prefix = f"runs/{run.id}/adapter"
    keys = stack.store.list(prefix)
    assert keys, f"nothing published under {prefix} in {stack.store.uri(prefix)}"
    for key in keys:
        stack.store.get_file(key, tmp_path / "adapter" / key.removeprefix(prefix + "/"))
    return tmp_path / "adapter"


async def test_lora_run_learns_and_publishes_a_loadable_adapter(any_stack, tiny_model, datasets, tmp_path):
    """The end-to-end run, on SQLite + filesystem store and on PostgreSQL + S3 store."""
    from store.checkpoints import committed_steps
    from store.layout import checkpoint_manifest_key

    stack = any_stack
    spec = small_spec(tiny_model, datasets["instruction"], keep_checkpoints=1)
    run, handle = await run_to_end(stack, spec)

    assert run.state == RunState.succeeded.value, run.error
    assert run.step == run.total_steps == 24
    assert run.tuned_eval_loss < run.baseline_eval_loss
    checkpoints = {e.data["checkpoint"]: e.data for e in stack.db.events(run.id) if e.kind == "progress" and "checkpoint" in e.data}
    evals = [checkpoints[step]["eval_loss"] for step in sorted(checkpoints)]
    assert sorted(checkpoints) == [10, 20, 24] and evals[-1] < evals[0]
    # The newest checkpoint is kept, plus the one with the best checkpoint eval.
    best = min(checkpoints, key=lambda step: (checkpoints[step]["eval_loss"], -step))
    assert committed_steps(stack.store, run.id) == sorted({24, best}, reverse=True)
    # Every checkpoint measures the same eval rows; the last one also measured the whole eval
    # split, and that is the tuned eval loss, not measured a second time.
    assert len({c["eval_rows"] for c in checkpoints.values()}) == 1
    last = json.loads(stack.store.get_bytes(checkpoint_manifest_key(run.id, 24)))["meta"]
    assert run.tuned_eval_loss == last["final_eval_loss"]

    assert run.adapter_uri.startswith("s3://" if stack.settings.artifact_store == "s3" else "file://")
    adapter = adapter_dir(stack, run, tmp_path)
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
    # Tests suggest continue-as-new early (conftest): the run crossed it mid-training.
    latest = await stack.client.get_workflow_handle(run.id).describe()
    assert latest.run_id != handle.first_execution_run_id
    states = [e.state for e in stack.db.events(run.id) if e.kind == "state"]
    assert states == [s.value for s in (
        RunState.queued, RunState.preflight, RunState.preparing_data, RunState.baseline_eval,
        RunState.training, RunState.evaluating, RunState.publishing, RunState.succeeded,
    )]


async def test_qlora_run_trains_on_a_4bit_base(stack, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], method="qlora", hyperparameters={"max_steps": 12})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.succeeded.value, run.error
    assert run.tuned_eval_loss < run.baseline_eval_loss
    manifest = json.loads((Path(run.adapter_path) / "lockn-manifest.json").read_text())
    assert manifest["method"] == "qlora"


def test_qlora_loads_the_base_in_nf4(tiny_model):
    """The QLoRA path really quantizes: linear layers are bitsandbytes 4-bit."""
    import bitsandbytes as bnb

    from schemas.run_spec import ResolvedHyperparameters
    from worker_gpu.model_loading import load_base_model, pick_device

    spec = small_spec(tiny_model, "unused.jsonl", method="qlora")
    hp = ResolvedHyperparameters(**{
        **spec.hyperparameters.model_dump(), "epochs": 1, "warmup_ratio": 0.0, "gradient_checkpointing": False,
        "batching": "padded",
    })
    plan = TrainingPlan.model_construct(spec=spec, base_model_path=str(tiny_model), hyperparameters=hp)
    model = load_base_model(plan, pick_device())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"


@pytest.mark.parametrize("shape", ["chat", "completion"])
async def test_each_dataset_shape_trains(stack, tiny_model, datasets, shape):
    spec = small_spec(tiny_model, datasets[shape], hyperparameters={"max_steps": 12})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.succeeded.value, run.error
    assert run.dataset_snapshot["shape"] == shape
    assert run.tuned_eval_loss < run.baseline_eval_loss


BAD_DATASETS = {
    "malformed_json": (b'{"instruction": "a", "output": "b"\n{"instruction": "c" "output": "d"}\nnot json\n', "line 2: not valid JSON"),
    "missing_fields": (b'{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": "c", "output": "d"}\n', "field 'output' is missing"),
    "empty_file": (b"", "dataset is empty"),
    "wrong_roles": (
        b'{"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n'
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n',
        "messages[1].role is 'bot'; use one of system, user, assistant",
    ),
    "not_utf8": ('{"instruction": "café", "output": "thé"}\n'.encode("latin-1") * 3, "not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATASETS))
async def test_bad_dataset_is_refused_before_training(stack, tiny_model, tmp_path, name):
    content, expected = BAD_DATASETS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    run, handle = await run_to_end(stack, small_spec(tiny_model, path))
    assert run.state == RunState.failed.value
    assert expected in run.error
    states = [e.state for e in stack.db.events(run.id) if e.kind == "state"]
    assert RunState.training.value not in states and RunState.baseline_eval.value not in states
    assert (await handle.describe()).status.name == "FAILED"


async def test_missing_base_model_fails_with_what_to_do(stack, tmp_path, datasets):
    run, _ = await run_to_end(stack, small_spec(tmp_path / "no-such-model", datasets["instruction"]))
    assert run.state == RunState.failed.value
    assert "does not exist on the worker" in run.error


async def test_unknown_target_module_names_the_real_ones(stack, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"target_modules": ["c_attn"]})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.failed.value
    assert "c_attn" in run.error and "q_proj" in run.error


async def test_cancel_mid_training_checkpoints_and_ends_cancelled(stack, tiny_model, datasets):
    import asyncio

    from store.checkpoints import committed_steps

    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 2000}, checkpoint_every_steps=1000)
    run_id = new_id("run")
    stack.db.create_run(run_id, spec)
    handle = await start_run_workflow(stack.client, stack.settings, run_id, spec)
    for _ in range(600):
        row = stack.db.get_run(run_id)
        if row.state == RunState.training.value and row.step >= 3:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"run never reached training: {row.state} {row.error}")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    row = stack.db.get_run(run_id)
    assert row.state == RunState.cancelled.value
    steps = committed_steps(stack.store, run_id)
    # The chunk stopped early (well before its 1000 steps) and committed a checkpoint first.
    assert steps and 3 <= steps[0] < 1000
    assert (await handle.describe()).status.name == "CANCELED"


async def test_out_of_memory_retries_with_a_smaller_micro_batch(stack, tiny_model, datasets):
    stack.settings.faults = "oom_above=2"  # micro-batches above 2 "do not fit" on this worker
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 12, "micro_batch_size": 8})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.succeeded.value, run.error
    retries = [e.message for e in stack.db.events(run.id) if "retrying with micro-batch" in e.message]
    assert len(retries) == 2 and "micro-batch 4 x grad_accum 2 (same 8 examples per step)" in retries[0]
    # One consistent plan after the back-off: the batch shape is held once, the memory estimate
    # follows it, and the published lineage says what trained.
    plan = TrainingPlan.model_validate(run.plan)
    assert (plan.micro_batch_size, plan.grad_accum) == (2, 4)
    assert "micro_batch_size" not in run.plan and "memory_estimate_bytes" not in run.plan
    assert plan.memory_estimate_bytes == plan.memory_estimates[2] < plan.memory_estimates[8]
    manifest = json.loads(Path(run.adapter_path, "lockn-manifest.json").read_text())
    assert (manifest["hyperparameters"]["micro_batch_size"], manifest["hyperparameters"]["grad_accum"]) == (2, 4)
    assert manifest["hyperparameters"] == {**plan.hyperparameters.model_dump(mode="json"), **{
        k: manifest["hyperparameters"][k] for k in ("total_steps", "warmup_steps", "precision")
    }}


async def test_out_of_memory_at_micro_batch_one_says_what_to_change(stack, tiny_model, datasets):
    stack.settings.faults = "oom_above=0"
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 12, "micro_batch_size": 2})
    run, _ = await run_to_end(stack, spec)
    assert run.state == RunState.failed.value
    assert "does not fit even with micro-batch 1" in run.error and "max_seq_len" in run.error
