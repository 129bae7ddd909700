"""Keyed event writes on SQLite and PostgreSQL: an activity retried after it wrote its event
(a lost heartbeat, a worker restart) writes it again under the same key and adds nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from schemas.run_spec import RunSpec
from schemas.run_state import RunState
from store.blocking import BlockingDatabase

RUN = "run_keys"


@pytest.fixture
def db(db_url):
    db = BlockingDatabase(db_url)
    spec = RunSpec.model_validate({"project": "acme", "name": "r", "base_model": "/m", "dataset": "/d.jsonl"})
    db.create_run(RUN, spec)
    yield db
    db.close()


def test_the_same_keyed_progress_twice_is_one_event_and_one_run_update(db):
    assert db.record_progress(RUN, 10, 100, 2.5, {"lr": 1e-4}, key="progress-10") is True
    first = db.get_run(RUN)
    # The retry carries what the second attempt measured: it must change nothing.
    assert db.record_progress(RUN, 11, 100, 9.9, {"lr": 1e-4}, key="progress-10") is False
    after = db.get_run(RUN)
    assert (after.step, after.total_steps, after.loss, after.updated_at) == (10, 100, 2.5, first.updated_at)
    assert [(e.kind, e.step) for e in db.events(RUN, kind="progress")] == [("progress", 10)]


def test_the_same_keyed_event_twice_is_one_event(db):
    assert db.add_event(RUN, "info", "resumed from checkpoint 3", key="resume-3") is True
    assert db.add_event(RUN, "info", "resumed from checkpoint 3", key="resume-3") is False
    assert [e.message for e in db.events(RUN, kind="info")] == ["resumed from checkpoint 3"]


def test_different_keys_and_no_keys_are_separate_events(db):
    assert db.add_event(RUN, "warning", "a", key="w-1") is True
    assert db.add_event(RUN, "warning", "b", key="w-2") is True
    # Without a key nothing is merged: NULL keys never collide.
    assert db.add_event(RUN, "warning", "c") is True
    assert db.add_event(RUN, "warning", "c") is True
    assert [e.message for e in db.events(RUN, kind="warning")] == ["a", "b", "c", "c"]


def test_the_same_key_written_concurrently_is_recorded_once(db):
    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(lambda _: db.add_event(RUN, "info", "once", key="race"), range(4)))
    assert sorted(added) == [False, False, False, True]
    assert [e.message for e in db.events(RUN, kind="info")] == ["once"]


def test_a_state_recorded_by_key_alone_never_takes_a_workflow_seq(db):
    assert db.record_state(RUN, None, RunState.failed, "could not start", {}, key="start-failed", error="boom") is True
    assert db.record_state(RUN, None, RunState.failed, "could not start", {}, key="start-failed", error="other") is False
    row = db.get_run(RUN)
    assert (row.state, row.error) == (RunState.failed.value, "boom")
    # The workflow's own seq 1 is still free.
    assert db.record_state(RUN, 1, RunState.preflight, "preflight", {}) is True
    assert db.record_state(RUN, 1, RunState.preflight, "preflight", {}) is False
    assert [(e.seq, e.state) for e in db.events(RUN, kind="state")] == [(0, "queued"), (None, "failed"), (1, "preflight")]


def test_a_state_without_seq_or_key_is_refused(db):
    with pytest.raises(ValueError, match="seq or a key"):
        db.record_state(RUN, None, RunState.failed, "x", {})
