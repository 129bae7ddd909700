"""The one GPU slot on the real stack (Temporal dev server, in-process workers, real training on
the tiny model): what a GPU activity consumes is bounded by the plan, a cancel frees the slot
within a heartbeat interval, and hardware reports and dry runs never queue behind training.

Run: `HF_HUB_OFFLINE=1 python -m pytest -q tests/activities/test_gpu_slot.py`
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowFailureError

from api.app import create_app
from api.routes.runs import start_run_workflow
from activities.demo_data import demo_texts
from schemas.run_state import RunState
from store.tables import new_id
from tests.conftest import small_spec
from worker_gpu.samples import SAMPLE_TEXT_CHARS

MB = 1_000_000


def megabyte_chat_dataset(path: Path, rows: int = 8, size: int = MB) -> Path:
    """Chat rows whose last user turn carries a ~1 MB document. The first exchange is short, so
    every row still has answer tokens after truncation; the eval prompts are all megabytes."""
    words = " ".join(demo_texts()).split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            rng = random.Random(i)  # a different document per row: no duplicates
            document = " ".join(rng.choice(words) for _ in range(size // 5))[:size]
            messages = [
                {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                {"role": "user", "content": f"Here is document {i}:\n{document}\nSum it up in one line."},
                {"role": "assistant", "content": f"Document {i} is a long list of words."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# Every row is over-long: leave max_seq_len to preflight (the model's context, with a warning).
LONG_ROWS = {"max_seq_len": None}


async def start(stack, spec):
    run_id = new_id("run")
    stack.db.create_run(run_id, spec)
    return run_id, await start_run_workflow(stack.client, stack.settings, run_id, spec)


async def wait_state(stack, run_id, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = stack.db.get_run(run_id)
        if predicate(row):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: run {run_id} still {row.state} (step {row.step}) after {timeout:.0f} s; {row.error}")


def state_times(stack, run_id) -> dict[str, float]:
    """When the run first entered each state (run event timestamps)."""
    times: dict[str, float] = {}
    for event in stack.db.events(run_id):
        if event.kind == "state":
            times.setdefault(event.state, event.ts)
    return times


@pytest.mark.timeout(240)  # the old code generated from 300k-token prompts: hours
async def test_eval_of_megabyte_rows_is_bounded_by_the_plan(stack, tiny_model, tmp_path):
    data = megabyte_chat_dataset(tmp_path / "long.jsonl")
    spec = small_spec(tiny_model, data, hyperparameters=LONG_ROWS | {"max_steps": 2}, checkpoint_every_steps=2)
    run_id, handle = await start(stack, spec)
    await handle.result()

    run = stack.db.get_run(run_id)
    assert run.state == RunState.succeeded.value, run.error
    times = state_times(stack, run_id)
    baseline_seconds = times["training"] - times["baseline_eval"]
    tuned_seconds = times["publishing"] - times["evaluating"]
    assert baseline_seconds < 30 and tuned_seconds < 30, (baseline_seconds, tuned_seconds)
    for label in ("baseline", "tuned"):
        samples = run.metrics[label]["samples"]
        assert samples, label
        for sample in samples:
            # The model saw the end of the prompt (where the answer starts), and the report stays small.
            assert sample["prompt"].startswith("…") and len(sample["prompt"]) <= SAMPLE_TEXT_CHARS + 1
            assert sample["prompt"].rstrip().endswith("assistant"), sample["prompt"][-200:]  # ChatML's answer header
            assert len(sample["reference"]) <= SAMPLE_TEXT_CHARS + 1


@pytest.mark.timeout(300)
async def test_cancel_in_baseline_eval_frees_the_slot_within_a_heartbeat(stack, tiny_model, datasets, tmp_path):
    # A slow GPU for the first eval on this home, so the cancel surely lands in it: about 100 s of
    # eval batches and generated tokens, two seconds each.
    stack.settings.faults = "slow_eval=2"
    long = megabyte_chat_dataset(tmp_path / "long.jsonl")
    slow_id, slow = await start(stack, small_spec(tiny_model, long, hyperparameters=LONG_ROWS))
    await wait_state(stack, slow_id, lambda r: r.state == "baseline_eval", 180, "the first run never reached its eval")

    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 4}, checkpoint_every_steps=4)
    next_id, nxt = await start(stack, spec)
    # Its preflight asks for the hardware on the hardware queue, not behind the eval holding the GPU.
    await wait_state(stack, next_id, lambda r: r.state == "baseline_eval", 60, "the next run queued behind the eval")

    assert stack.db.get_run(slow_id).state == "baseline_eval"  # still evaluating when cancelled
    cancelled_at = time.time()
    await slow.cancel()
    with pytest.raises(WorkflowFailureError):
        await slow.result()
    assert stack.db.get_run(slow_id).state == RunState.cancelled.value

    # The cancelled eval stops between batches/tokens; the next run's eval takes the slot.
    heartbeat = stack.settings.heartbeat_every_s
    trained = await wait_state(stack, next_id, lambda r: r.state == "training", 60, "the GPU slot stayed busy")
    freed_after = state_times(stack, next_id)["training"] - cancelled_at
    # A heartbeat for the cancel to arrive, one slowed batch or token to end, then the next run's own eval.
    assert freed_after < heartbeat + 15, f"the next run reached training {freed_after:.1f} s after the cancel"
    assert trained.state == "training"
    assert "training" not in state_times(stack, slow_id)
    await nxt.result()
    assert stack.db.get_run(next_id).state == RunState.succeeded.value


@pytest.mark.timeout(300)
async def test_models_and_dry_run_answer_while_a_run_trains(stack, temporal_env, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 3000}, checkpoint_every_steps=1500)
    run_id, handle = await start(stack, spec)
    await wait_state(stack, run_id, lambda r: r.state == "training" and r.step >= 3, 120, "never trained")

    settings = stack.settings.model_copy(update={"temporal_address": temporal_env.client.service_client.config.target_host})
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as api:
        started = time.monotonic()
        models = await api.get("/v1/models")
        models_seconds = time.monotonic() - started
        assert models.status_code == 200, models.text
        assert models_seconds < 5, f"GET /v1/models took {models_seconds:.1f} s while a run trained"

        ds = (await api.post("/v1/datasets", files={"file": ("i.jsonl", datasets["instruction"].read_bytes())},
                             params={"project": "tests"})).json()
        body = small_spec(tiny_model, ds["id"]).model_dump(mode="json")
        started = time.monotonic()
        dry = await api.post("/v1/preflight", json=body)
        dry_seconds = time.monotonic() - started
        assert dry.status_code == 200, dry.text
        assert dry.json()["ok"] is True, dry.json()["errors"]
        assert dry_seconds < 10, f"a dry run took {dry_seconds:.1f} s while a run trained"

    # The run kept the GPU all along: still training, further on.
    row = stack.db.get_run(run_id)
    assert row.state == "training" and row.step < 3000
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()


@pytest.mark.timeout(300)
async def test_worker_shutdown_during_eval_ends_at_once_and_the_eval_runs_again(temporal_env, tiny_model, datasets, tmp_path):
    """SIGTERM-like stop of worker_gpu while it evaluates: it stops between batches, far inside its
    graceful-shutdown timeout (120 s), and the eval is retried on the next GPU worker."""
    from concurrent.futures import ThreadPoolExecutor

    from store.blocking import BlockingDatabase
    from store.open_store import open_store
    from tests.conftest import Stack, stack_settings
    from worker_cpu.main import build_worker as cpu_worker
    from worker_gpu.main import build_worker as gpu_worker

    settings = stack_settings(tmp_path / "home")
    settings.faults = "slow_eval=2"
    client = temporal_env.client
    db = BlockingDatabase(settings.db_url)
    stack = Stack(client, settings, db, open_store(settings))
    try:
        with ThreadPoolExecutor(8) as cpu_pool:
            async with cpu_worker(client, settings, cpu_pool, db):
                spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 4}, checkpoint_every_steps=4)
                with ThreadPoolExecutor(2) as gpu_pool:
                    async with gpu_worker(client, settings, gpu_pool, db):
                        run_id, handle = await start(stack, spec)
                        await wait_state(stack, run_id, lambda r: r.state == "baseline_eval", 120, "never reached its eval")
                        await asyncio.sleep(2 * settings.heartbeat_every_s)  # well inside the slowed eval
                        stopping = time.monotonic()
                    stopped_in = time.monotonic() - stopping
                assert stopped_in < 10, f"worker_gpu took {stopped_in:.1f} s to stop during an eval"
                assert stack.db.get_run(run_id).state == "baseline_eval"  # the run waits for a GPU worker

                with ThreadPoolExecutor(2) as gpu_pool:
                    async with gpu_worker(client, settings, gpu_pool, db):
                        await handle.result()
                assert stack.db.get_run(run_id).state == RunState.succeeded.value
    finally:
        db.close()
