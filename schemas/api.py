"""Shapes the HTTP API returns (the LockN dashboard and the CLI read these)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.run_spec import SLUG
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
    pause_requested: bool = Field(
        False,
        description="In the answers of pause and resume, as the workflow said: a pause was asked for and the run "
        "pauses after its current step. Elsewhere false; a paused run's state is paused.",
    )
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
    kind: str = Field(description="state | progress | info | warning | preflight")
    state: str | None
    step: int | None
    message: str
    data: dict[str, Any]


class DatasetRunRef(BaseModel):
    id: str
    name: str
    state: RunState


class DatasetSummary(BaseModel):
    id: str = Field(description="Content-addressed per project: the same bytes uploaded again give this id.")
    project: str
    name: str = Field(description="Display name given at the first upload of these bytes.")
    sha256: str
    size_bytes: int
    shape: str | None
    total_rows: int
    valid_rows: int
    bad_rows: int
    created_at: float
    created_by: str | None = None
    runs: list[DatasetRunRef] = Field(default_factory=list, description="Runs that use this dataset, oldest first.")


class DatasetView(DatasetSummary):
    report: dict[str, Any] = Field(description="Validation report: problems with line numbers and reasons.")


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


class Health(BaseModel):
    status: str
    database: str
    temporal: str


class ArtifactDetail(ArtifactView):
    id: str
    run_id: str
    project: str
    created_at: float


class CheckpointPublishView(BaseModel):
    """What POST /v1/runs/{id}/publish-checkpoint answers."""

    run_id: str
    status: Literal["published", "publishing"] = Field(
        description="published: the artifact is ready; publishing: still copying, ask again (the same call) later."
    )
    step: int = Field(description="The checkpoint's step.")
    total_steps: int = Field(description="The steps the run planned.")
    workflow_id: str = Field(description="The PublishCheckpoint workflow (Temporal UI / CLI).")
    artifact: ArtifactDetail | None = Field(None, description="The partial adapter, once published.")


class ProjectCreate(BaseModel):
    id: str = Field(pattern=SLUG, description="Project slug: runs, datasets and token roles name it.")
    display_name: str = Field("", max_length=200)
    description: str = Field("", max_length=2000)


class ProjectUpdate(BaseModel):
    display_name: str | None = Field(None, max_length=200)
    description: str | None = Field(None, max_length=2000)


class ProjectView(BaseModel):
    id: str
    display_name: str
    description: str
    created_by: str | None
    created_at: float
    your_role: str | None = Field(None, description="The caller's role in this project: viewer, operator or admin.")


class ProjectList(BaseModel):
    projects: list[ProjectView]


class ConsentCreate(BaseModel):
    speaker: str = Field(min_length=1, max_length=200, description="The person whose voice may be cloned.")
    statement: str = Field(
        min_length=10, max_length=5000, description="What the speaker agreed to: which voice, what use, how long."
    )
    evidence_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the evidence, e.g. the speaker reading the statement."
    )


class ConsentView(BaseModel):
    id: str
    project: str
    speaker: str
    statement: str
    evidence_sha256: str | None
    recorded_by: str | None
    created_at: float
    revoked_at: float | None
    revoked_by: str | None
    active: bool


class ConsentList(BaseModel):
    consents: list[ConsentView]


class PublishTargetKind(str, Enum):
    ollama = "ollama"
    s3 = "s3"
    huggingface = "huggingface"
    directory = "directory"


class PublishTargetCreate(BaseModel):
    name: str = Field(pattern=SLUG, description="Name runs use to publish here.")
    kind: PublishTargetKind
    config: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="Where, e.g. {'endpoint': 'http://ollama:11434'} or {'bucket': 'models'}. No secrets: "
        "credentials come from the publishing worker's environment.",
    )


class PublishTargetView(BaseModel):
    id: str
    project: str
    name: str
    kind: PublishTargetKind
    config: dict[str, Any]
    created_by: str | None
    created_at: float


class PublishTargetList(BaseModel):
    targets: list[PublishTargetView]


class WhoAmI(BaseModel):
    subject: str
    auth_enabled: bool
    roles: dict[str, str] = Field(description="Project → role; '*' means every project.")


class ErrorView(BaseModel):
    detail: str | list[Any] | dict[str, Any] = Field(
        description="What was wrong and what to do: a message, field errors (with loc), or a report."
    )
