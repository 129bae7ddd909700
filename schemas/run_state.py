"""Run states and the status a run reports."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class RunState(str, Enum):
    queued = "queued"
    preflight = "preflight"
    preparing_data = "preparing_data"
    baseline_eval = "baseline_eval"
    training = "training"
    paused = "paused"
    evaluating = "evaluating"
    publishing = "publishing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.succeeded, RunState.failed, RunState.cancelled)


class RunStatus(BaseModel):
    """What the `status` workflow query returns, and what the run's row and search attributes
    are written from. `step` and `loss` move once per committed chunk here; the row's also
    move with the progress training reports inside a chunk."""

    run_id: str
    state: RunState = RunState.queued
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    baseline_eval_loss: float | None = None
    tuned_eval_loss: float | None = None
    adapter_uri: str | None = None
    adapter_path: str | None = Field(None, description="Local directory of the published adapter, when the store is local.")
    manifest_uri: str | None = Field(None, description="The published adapter's lineage manifest.")
    pause_requested: bool = Field(False, description="A pause was asked for; the run pauses at the next step.")
    error: str | None = Field(None, description="Why the run failed, in words a person can act on.")
