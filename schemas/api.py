"""Shapes the HTTP API returns (the LockN dashboard and the CLI read these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from schemas.run_state import RunState


class ArtifactView(BaseModel):
    kind: str = Field(description="adapter")
    uri: str
    path: str | None = Field(None, description="Local directory, when the artifact store is local.")
    sha256: str = Field(description="sha256 of the adapter weights file.")
    size_bytes: int
    manifest: dict[str, Any] = Field(description="Lineage manifest: dataset, base model, spec, seed, packages, metrics.")


class RunView(BaseModel):
    id: str
    project: str
    name: str
    kind: str
    method: str
    base_model: str
    dataset: str
    state: RunState
    step: int
    total_steps: int | None
    progress: float = Field(description="Share of planned training steps done, 0..1.")
    loss: float | None = Field(None, description="Latest training loss.")
    baseline_eval_loss: float | None
    tuned_eval_loss: float | None
    error: str | None = Field(None, description="Why the run failed, and what to do.")
    adapter_uri: str | None
    adapter_path: str | None
    manifest_uri: str | None
    created_at: float
    updated_at: float
    temporal_ui_url: str
    spec: dict[str, Any]
    spec_sha256: str
    plan: dict[str, Any] | None = None
    dataset_snapshot: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    artifacts: list[ArtifactView] = Field(default_factory=list)


class RunList(BaseModel):
    runs: list[RunView]


class EventView(BaseModel):
    id: int
    ts: float
    kind: str = Field(description="state | progress | info | warning")
    state: str | None
    step: int | None
    message: str
    data: dict[str, Any]


class DatasetView(BaseModel):
    id: str
    project: str
    name: str
    sha256: str
    size_bytes: int
    shape: str | None
    total_rows: int
    valid_rows: int
    bad_rows: int
    report: dict[str, Any] = Field(description="Validation report: problems with line numbers and reasons.")
    created_at: float


class Health(BaseModel):
    status: str
    database: str
    temporal: str
