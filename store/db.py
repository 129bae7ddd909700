"""The metadata DB: runs, run events, datasets and artifacts (SQLModel).

SQLite file in the embedded stack. The API reads it; workers write to it through the
activities (state transitions, progress, published artifacts). These tables are not
contracts: the API maps them to `schemas` models before they leave the process.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint, event
from sqlmodel import Field, Session, SQLModel, create_engine, select

from schemas.run_spec import RunSpec
from schemas.run_state import RunState


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"

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


class RunEventRow(SQLModel, table=True):
    __tablename__ = "run_events"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    # seq orders the workflow's own events and makes their recording idempotent;
    # progress events from training have none.
    seq: int | None = None
    ts: float = Field(default_factory=now)
    kind: str  # state | progress | info | warning
    state: str | None = None
    step: int | None = None
    message: str = ""
    data: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DatasetRow(SQLModel, table=True):
    __tablename__ = "datasets"

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


class Database:
    """Sessions over one engine, with the few queries the service needs."""

    def __init__(self, url: str):
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # API and workers share the file from several processes and threads.
            connect_args = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, connect_args=connect_args)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        SQLModel.metadata.create_all(self.engine)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # runs

    def create_run(self, run_id: str, spec: RunSpec) -> RunRow:
        row = RunRow(
            id=run_id,
            project=spec.project,
            name=spec.name,
            kind=spec.kind,
            method=spec.method.value,
            base_model=spec.base_model,
            dataset=spec.dataset,
            spec=spec.model_dump(mode="json"),
            spec_sha256=spec.sha256(),
        )
        with self.session() as s:
            s.add(row)
            s.add(RunEventRow(run_id=run_id, seq=0, kind="state", state=RunState.queued.value, message="run created"))
            s.commit()
        return row

    def get_run(self, run_id: str) -> RunRow | None:
        with self.session() as s:
            return s.get(RunRow, run_id)

    def list_runs(self, project: str | None = None, state: str | None = None, limit: int = 100) -> list[RunRow]:
        q = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
        if project:
            q = q.where(RunRow.project == project)
        if state:
            q = q.where(RunRow.state == state)
        with self.session() as s:
            return list(s.exec(q))

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                return
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = now()
            s.add(row)
            s.commit()

    def record_state(self, run_id: str, seq: int, state: RunState, message: str, data: dict, **fields: Any) -> bool:
        """Record a workflow state transition once; a retried call with the same seq is a no-op."""
        with self.session() as s:
            seen = s.exec(select(RunEventRow).where(RunEventRow.run_id == run_id, RunEventRow.seq == seq)).first()
            if seen is not None:
                return False
            s.add(RunEventRow(run_id=run_id, seq=seq, kind="state", state=state.value, message=message, data=data))
            row = s.get(RunRow, run_id)
            if row is not None:
                row.state = state.value
                row.updated_at = now()
                for k, v in fields.items():
                    setattr(row, k, v)
                s.add(row)
            s.commit()
            return True

    def record_progress(self, run_id: str, step: int, total_steps: int, loss: float | None, data: dict) -> None:
        with self.session() as s:
            s.add(RunEventRow(run_id=run_id, kind="progress", step=step, message="", data=data))
            row = s.get(RunRow, run_id)
            if row is not None:
                row.step, row.total_steps, row.loss, row.updated_at = step, total_steps, loss, now()
                s.add(row)
            s.commit()

    def add_event(self, run_id: str, kind: str, message: str, data: dict | None = None) -> None:
        with self.session() as s:
            s.add(RunEventRow(run_id=run_id, kind=kind, message=message, data=data or {}))
            s.commit()

    def events(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[RunEventRow]:
        q = (
            select(RunEventRow)
            .where(RunEventRow.run_id == run_id, RunEventRow.id > after_id)
            .order_by(RunEventRow.id)
            .limit(limit)
        )
        with self.session() as s:
            return list(s.exec(q))

    # datasets

    def add_dataset(self, row: DatasetRow) -> DatasetRow:
        with self.session() as s:
            s.add(row)
            s.commit()
        return row

    def get_dataset(self, dataset_id: str) -> DatasetRow | None:
        with self.session() as s:
            return s.get(DatasetRow, dataset_id)

    # artifacts

    def add_artifact(self, row: ArtifactRow) -> None:
        with self.session() as s:
            if s.get(ArtifactRow, row.id) is None:
                s.add(row)
                s.commit()

    def artifacts(self, run_id: str) -> list[ArtifactRow]:
        with self.session() as s:
            return list(s.exec(select(ArtifactRow).where(ArtifactRow.run_id == run_id).order_by(ArtifactRow.created_at)))


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
