"""Replay recorded TuneLLM histories against the current workflow code.

Guards determinism: runs in flight in production (including those parked in `paused` for
days) are replayed by new workers after every deploy. Any change to workflows/tune_llm.py
that would make the new code issue different commands for an old history (an activity
added, removed or reordered, a different state transition, timer, continue-as-new point,
update or signal handling) fails here instead of failing those runs with a
non-determinism error.

The histories in tests/workflows/histories/ cover a run that succeeds (and continues as
new), one paused and resumed through the pause_run/resume_run updates, one refused in
preflight, and one cancelled mid-training. These tests need no Temporal server.

When a workflow change is intentional, version it (`workflow.patched(...)` or a new
workflow type) so that these old histories still replay, then add fresh histories for the
new code path by re-recording from the repository root:

    python -m tests.workflows.record_histories
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.tune_llm import TuneLLM

HISTORIES = Path(__file__).resolve().parent / "histories"
FILES = sorted(p.name for p in HISTORIES.glob("*.json"))
SCENARIOS = ("succeeds", "pause_resume", "preflight_fails", "cancelled")
MISSING = "<no histories recorded>"


@pytest.fixture(scope="module")
def replayer() -> Replayer:
    return Replayer(workflows=[TuneLLM], data_converter=pydantic_data_converter)


def load(name: str) -> WorkflowHistory:
    text = (HISTORIES / name).read_text(encoding="utf-8")
    workflow_id = json.loads(text).get("workflowId") or Path(name).stem
    return WorkflowHistory.from_json(workflow_id, text)


# An empty folder must fail, not collect zero tests (pytest would skip an empty parameter set).
@pytest.mark.parametrize("name", FILES or [MISSING])
async def test_history_replays(replayer, name):
    assert name != MISSING, f"no *.json histories in {HISTORIES}; run `python -m tests.workflows.record_histories`"
    history = load(name)
    assert history.events, f"{name} has no events"
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{name} no longer replays: {result.replay_failure!r}"


def test_every_scenario_has_a_history():
    recorded = {name.rsplit("-", 1)[0] for name in FILES}
    missing = [s for s in SCENARIOS if s not in recorded]
    assert not missing, f"no history for {missing} in {HISTORIES}; run `python -m tests.workflows.record_histories`"
