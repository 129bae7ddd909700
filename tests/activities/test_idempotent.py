"""Every activity run twice with the same input leaves the same rows and the same objects.

Temporal retries an activity whenever its worker dies or its answer is lost, so each one
must be a no-op the second time: preflight (its report and warnings), record_event (the
event and the run's row), snapshot_dataset, train_chunk (its progress rows, also when the
chunk is trained again after a crash lost its checkpoint), and publish (the adapter's files,
manifest, card and artifact row). Real activities, a real SQLite DB, a real artifact store,
real training on the tiny model; Temporal's ActivityEnvironment gives them an activity context.

    python -m pytest tests/activities/test_idempotent.py -q
"""

from __future__ import annotations

import hashlib

import pytest
from temporalio.testing import ActivityEnvironment

from activities.cpu import CpuActivities
from schemas.activities import ChunkInput, EvalResult, PublishInput, RecordEventInput, SnapshotInput
from schemas.hardware import HardwareInfo
from schemas.preflight import PreflightInput
from schemas.run_state import RunState, RunStatus
from schemas.settings import Settings
from store.blocking import BlockingDatabase
from store.layout import checkpoints_prefix
from store.open_store import open_store
from tests.conftest import small_spec
from worker_gpu.activities import GpuActivities

RUN = "run_idempotent"
CPU = HardwareInfo(device="cpu", cpu_count=2, memory_available_bytes=16 * 2**30, bitsandbytes_usable=True, disk_free_bytes=2**40)


@pytest.fixture
def world(tmp_path, tiny_model, datasets):
    settings = Settings(home=tmp_path / "home", heartbeat_every_s=1.0, progress_every_s=0.0)
    db = BlockingDatabase(settings.db_url)
    store = open_store(settings)
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 4}, checkpoint_every_steps=4)
    db.create_run(RUN, spec)
    yield settings, db, store, spec
    db.close()


def rows(db: BlockingDatabase) -> tuple:
    """Everything the DB holds about the run: its row, its events, its artifacts."""
    run = db.get_run(RUN).model_dump()
    events = [e.model_dump() for e in db.events(RUN)]
    artifacts = [a.model_dump() for a in db.run(db.aio.artifacts(RUN))]
    return run, events, artifacts


def objects(store) -> dict[str, str]:
    """Every object in the artifact store, by key, with the sha256 of its bytes."""
    return {key: hashlib.sha256(store.get_bytes(key)).hexdigest() for key in store.list("")}


def twice(db, store, fn, arg):
    """Run the activity twice; the second run must change no row and no object, and answer the same."""
    env = ActivityEnvironment()
    first = env.run(fn, arg)
    before = rows(db), objects(store)
    second = env.run(fn, arg)
    after = rows(db), objects(store)
    assert after[0] == before[0], f"{fn.__name__} run again changed the DB"
    assert after[1] == before[1], f"{fn.__name__} run again changed the artifact store"
    return first, second


def test_every_activity_run_twice_leaves_the_same_rows_and_objects(world):
    settings, db, store, spec = world
    cpu, gpu = CpuActivities(settings, db, store), GpuActivities(settings, db, store)

    plan, again = twice(db, store, cpu.preflight, PreflightInput(run_id=RUN, spec=spec, hardware=CPU))
    assert plan == again
    kinds = [e.kind for e in db.events(RUN)]
    assert kinds.count("preflight") == 1 and kinds.count("warning") == len(plan.warnings) > 0

    status = RunStatus(run_id=RUN, state=RunState.preparing_data, total_steps=plan.total_steps)
    event = RecordEventInput(
        run_id=RUN, seq=1, state=RunState.preparing_data, message="plan", data={"total_steps": plan.total_steps},
        status=status, attach={"plan": plan.model_dump(mode="json")},
    )
    twice(db, store, cpu.record_event, event)
    run = db.get_run(RUN)
    assert (run.state, run.total_steps, run.plan["total_steps"]) == ("preparing_data", plan.total_steps, plan.total_steps)

    snapshot, again = twice(db, store, cpu.snapshot_dataset, SnapshotInput(run_id=RUN, plan=plan))
    assert snapshot == again

    chunk_input = ChunkInput(run_id=RUN, plan=plan, snapshot=snapshot, from_step=0, until_step=plan.total_steps)
    chunk, again = twice(db, store, gpu.train_chunk, chunk_input)
    assert (chunk.step, chunk.step_losses) == (again.step, again.step_losses) == (plan.total_steps, chunk.step_losses)
    progress = [e.step for e in db.events(RUN) if e.kind == "progress"]
    assert progress and progress[-1] == plan.total_steps and len(progress) == len(set(progress)) + 1  # + the checkpoint's

    # A crash that lost the checkpoint after training reported its progress: the chunk trains the
    # same steps again (bit-identically) and reports them under the same keys, adding no row.
    reported = rows(db)
    store.delete_prefix(checkpoints_prefix(RUN))
    retrained = ActivityEnvironment().run(gpu.train_chunk, chunk_input)
    assert retrained.step_losses == chunk.step_losses
    assert rows(db) == reported

    baseline = EvalResult(label="baseline", loss=3.0, perplexity=20.1, tokens=9)
    tuned = EvalResult(label="tuned", loss=2.0, perplexity=7.4, tokens=9)
    publish = PublishInput(
        run_id=RUN, plan=plan, snapshot=snapshot, checkpoint=retrained.checkpoint, baseline=baseline, tuned=tuned
    )
    published, again = twice(db, store, cpu.publish, publish)
    assert published == again
    [artifact] = db.run(db.aio.artifacts(RUN))
    assert artifact.manifest["hyperparameters"]["micro_batch_size"] == plan.micro_batch_size
