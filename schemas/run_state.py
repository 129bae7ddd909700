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
    """What the `status` workflow query returns."""

    run_id: str
    state: RunState = RunState.queued
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    baseline_eval_loss: float | None = None
    tuned_eval_loss: float | None = None
    adapter_uri: str | None = None
    pause_requested: bool = Field(False, description="A pause was asked for; the run pauses at the next step.")
    error: str | None = Field(None, description="Why the run failed, in words a person can act on.")
