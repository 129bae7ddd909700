"""Pause, resume and cancel: through the API (updates), and as an operator would with the
`temporal` CLI (signals, cancel). A paused-and-resumed run ends with the same adapter,
bit for bit, as an uninterrupted one."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowFailureError

from api.app import create_app
from api.routes.runs import start_run_workflow
from cli.stack import temporal_binary
from schemas.run_state import RunState
from store.checkpoints import committed_steps
from store.tables import new_id
from tests.conftest import small_spec


async def wait_state(stack, run_id, predicate, timeout=120):
    for _ in range(int(timeout * 10)):
        row = stack.db.get_run(run_id)
        if predicate(row):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"{run_id} stuck: {row.state} step {row.step} {row.error}")


def adapter_sha(run) -> str:
    return hashlib.sha256((Path(run.adapter_path) / "adapter_model.safetensors").read_bytes()).hexdigest()


async def start(stack, spec):
    run_id = new_id("run")
    stack.db.create_run(run_id, spec)
    handle = await start_run_workflow(stack.client, stack.settings, run_id, spec)
    return run_id, handle


LONG = {"hyperparameters": {"max_steps": 400}, "checkpoint_every_steps": 200}


async def test_pause_and_resume_over_the_api_gives_the_same_adapter(stack, temporal_env, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], **LONG)
    settings = stack.settings.model_copy(update={"temporal_address": temporal_env.client.service_client.config.target_host})
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as api:
        run_id, handle = await start(stack, spec)
        assert (await api.post(f"/v1/runs/{run_id}/resume")).status_code == 409  # not paused
        await wait_state(stack, run_id, lambda r: r.state == "training" and r.step >= 20)
        r = await api.post(f"/v1/runs/{run_id}/pause")
        assert r.status_code == 202, r.text
        paused = await wait_state(stack, run_id, lambda r: r.state == "paused")
        # The chunk stopped mid-way (not at its 200-step boundary) and committed a checkpoint there.
        steps = committed_steps(stack.store, run_id)
        assert steps and 20 <= steps[0] < 200 and steps[0] == paused.step
        desc = await handle.describe()
        assert not desc.raw_description.pending_activities, "a paused run must hold no GPU activity"
        assert (await api.post(f"/v1/runs/{run_id}/pause")).status_code == 409  # already paused
        await asyncio.sleep(1.5)
        assert stack.db.get_run(run_id).step == paused.step  # nothing trains while paused

        assert (await api.post(f"/v1/runs/{run_id}/resume")).status_code == 202
        await handle.result()
    resumed = stack.db.get_run(run_id)
    assert resumed.state == "succeeded" and resumed.step == 400
    states = [e.state for e in stack.db.events(run_id) if e.kind == "state"]
    assert states.count("paused") == 1 and states.count("training") == 2

    straight_id, straight = await start(stack, spec)
    await straight.result()
    assert adapter_sha(stack.db.get_run(straight_id)) == adapter_sha(resumed)
    # The loss history survives the pause: every step is in the manifest once.
    import json

    manifest = json.loads((Path(resumed.adapter_path) / "lockn-manifest.json").read_text())
    assert len(manifest["metrics"]["step_losses"]) == 400


async def temporal_cli(env, *args: str) -> subprocess.CompletedProcess:
    """The operator's `temporal` CLI, off the event loop (the workers share it and must answer queries)."""
    address = env.client.service_client.config.target_host
    return await asyncio.to_thread(
        subprocess.run, [temporal_binary(), *args, "--address", address], capture_output=True, text=True, timeout=60
    )


async def test_operator_pause_resume_and_cancel_with_the_temporal_cli(stack, temporal_env, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 3000}, checkpoint_every_steps=1500)
    run_id, handle = await start(stack, spec)
    await wait_state(stack, run_id, lambda r: r.state == "training" and r.step >= 5)

    listed = await temporal_cli(temporal_env, "workflow", "list", "--query", "LocknState='training' AND LocknProject='tests'")
    assert run_id in listed.stdout, listed.stderr

    r = await temporal_cli(temporal_env, "workflow", "signal", "--workflow-id", run_id, "--name", "pause")
    assert r.returncode == 0, r.stderr
    paused = await wait_state(stack, run_id, lambda r: r.state == "paused")
    assert paused.step < 1500
    listed = await temporal_cli(temporal_env, "workflow", "list", "--query", "LocknState='paused'")
    assert run_id in listed.stdout

    r = await temporal_cli(temporal_env, "workflow", "signal", "--workflow-id", run_id, "--name", "resume")
    assert r.returncode == 0, r.stderr
    await wait_state(stack, run_id, lambda r: r.state == "training" and r.step > paused.step)

    r = await temporal_cli(temporal_env, "workflow", "cancel", "--workflow-id", run_id)
    assert r.returncode == 0, r.stderr
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    row = await wait_state(stack, run_id, lambda r: r.state == RunState.cancelled.value)
    assert committed_steps(stack.store, run_id)[0] < 3000
    q = await temporal_cli(temporal_env, "workflow", "query", "--workflow-id", run_id, "--type", "status")
    assert '"cancelled"' in q.stdout or "cancelled" in q.stdout, q.stdout + q.stderr
    assert row.error is None


async def test_a_pause_is_reported_once_with_one_step_and_chunks_do_not_cry_resume(stack, tiny_model, datasets):
    """Four chunks and one pause mid-chunk: one 'paused at step S', one 'resumed at step S' with the
    step of the checkpoint the chunk stopped at, and no 'resumed from checkpoint' event
    (nothing was interrupted: starting a chunk from the last checkpoint is the plan)."""
    import re

    # Chunks long enough that the pause (heard at the next heartbeat) lands inside the second one.
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 1200}, checkpoint_every_steps=300)
    run_id, handle = await start(stack, spec)
    await wait_state(stack, run_id, lambda r: r.state == "training" and r.step >= 310)
    await handle.execute_update("pause_run")
    paused = await wait_state(stack, run_id, lambda r: r.state == "paused")
    stopped_at = committed_steps(stack.store, run_id)[0]
    assert 310 <= stopped_at < 600 and paused.step == stopped_at  # stopped mid-chunk, at its checkpoint
    await handle.execute_update("resume_run")
    await handle.result()
    assert stack.db.get_run(run_id).state == "succeeded"

    events = stack.db.events(run_id)
    messages = [e.message for e in events]
    pauses = [m for m in messages if m.startswith("paused")]
    resumes = [m for m in messages if m.startswith("resumed")]
    assert pauses == [f"paused at step {stopped_at}; the GPU is free"], messages
    assert resumes == [f"resumed at step {stopped_at}"], messages
    assert not [m for m in messages if re.search(r"resumed from checkpoint|interruption", m)], messages
