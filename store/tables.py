"""The metadata DB's tables: projects, runs, run events, datasets, dataset aliases, artifacts,
consents, publish targets.

SQLModel table classes registered on `SQLModel.metadata`, which the Alembic migrations
(store/migrations) are checked against. They are not contracts: the API maps them to
`schemas` models before they leave the process. The queries over them are in store/db.py.
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from schemas.run_state import RunState


def now() -> float:
    """Timestamps in the tables: seconds since the epoch."""
    return time.time()


def new_id(prefix: str) -> str:
    """A new row id, e.g. `run_0123456789abcdef`."""
    return f"{prefix}_{secrets.token_hex(8)}"


class ProjectRow(SQLModel, table=True):
    __tablename__ = "projects"

    id: str = Field(primary_key=True)  # the project's slug, as runs and tokens name it
    display_name: str = ""
    description: str = ""
    created_by: str | None = None
    created_at: float = Field(default_factory=now)


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (Index("uq_runs_project_idempotency_key", "project", "idempotency_key", unique=True),)

    id: str = Field(primary_key=True)
    project: str = Field(index=True)
    name: str
    kind: str
    method: str
    base_model: str
    dataset: str
    state: str = Field(default=RunState.queued.value, index=True)
    spec: dict = Field(sa_column=Column(JSON, nullable=False))
    spec_sha256: str
    created_at: float = Field(default_factory=now, index=True)
    updated_at: float = Field(default_factory=now)
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    baseline_eval_loss: float | None = None
    tuned_eval_loss: float | None = None
    error: str | None = None
    adapter_uri: str | None = None
    adapter_path: str | None = None
    manifest_uri: str | None = None
    plan: dict | None = Field(default=None, sa_column=Column(JSON))
    dataset_snapshot: dict | None = Field(default=None, sa_column=Column(JSON))
    metrics: dict | None = Field(default=None, sa_column=Column(JSON))
    created_by: str | None = None
    # A client's Idempotency-Key: a retried submission finds the run it already made.
    idempotency_key: str | None = None


class RunEventRow(SQLModel, table=True):
    __tablename__ = "run_events"
    # NULLs never collide: events without a seq or a key are never merged.
    __table_args__ = (
        UniqueConstraint("run_id", "seq"),
        Index("uq_run_events_run_id_key", "run_id", "key", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    # seq orders the workflow's own events and makes their recording idempotent;
    # progress events from training have none.
    seq: int | None = None
    # The writer's name for the event (e.g. "progress-120"): a retried activity writing
    # the same key adds no second row (migration 0004).
    key: str | None = Field(default=None, max_length=200)
    ts: float = Field(default_factory=now)
    kind: str  # state | progress | info | warning | preflight
    state: str | None = None
    step: int | None = None
    message: str = ""
    data: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DatasetRow(SQLModel, table=True):
    __tablename__ = "datasets"
    # Content-addressed per project: the same bytes uploaded again are the same dataset.
    __table_args__ = (Index("uq_datasets_project_sha256", "project", "sha256", unique=True),)

    id: str = Field(primary_key=True)
    project: str = Field(index=True)
    name: str
    sha256: str = Field(index=True)
    size_bytes: int
    shape: str | None
    total_rows: int
    valid_rows: int
    bad_rows: int
    store_key: str
    report: dict = Field(sa_column=Column(JSON, nullable=False))
    created_at: float = Field(default_factory=now)
    created_by: str | None = None


class DatasetAliasRow(SQLModel, table=True):
    """The id of a duplicate upload merged into `dataset_id` (migration 0003): runs' specs
    and users' notes that carry the old id still find the dataset."""

    __tablename__ = "dataset_aliases"

    id: str = Field(primary_key=True)
    dataset_id: str = Field(index=True)


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "artifacts"

    id: str = Field(primary_key=True)
    run_id: str = Field(index=True)
    kind: str  # adapter | manifest
    uri: str
    path: str | None = None
    sha256: str
    size_bytes: int
    manifest: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: float = Field(default_factory=now)


class ConsentRow(SQLModel, table=True):
    """A speaker's recorded consent to have their voice cloned in a project."""

    __tablename__ = "consents"

    id: str = Field(primary_key=True)
    project: str = Field(index=True)
    speaker: str
    statement: str  # what the speaker agreed to, in their words or the form's
    evidence_sha256: str | None = None  # e.g. the recording of the speaker reading the statement
    recorded_by: str | None = None
    created_at: float = Field(default_factory=now)
    revoked_at: float | None = None
    revoked_by: str | None = None


class PublishTargetRow(SQLModel, table=True):
    """Where a project's finished adapters may be published (Ollama, an S3 bucket, a registry)."""

    __tablename__ = "publish_targets"
    __table_args__ = (UniqueConstraint("project", "name", name="uq_publish_targets_project_name"),)

    id: str = Field(primary_key=True)
    project: str = Field(index=True)
    name: str
    kind: str
    config: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str | None = None
    created_at: float = Field(default_factory=now)
