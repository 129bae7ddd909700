"""The metadata DB: projects, runs, run events, datasets, artifacts, consents, publish targets.

SQLModel tables over SQLAlchemy's asyncio engine: a SQLite file through aiosqlite in the
embedded stack, PostgreSQL through asyncpg in production. The schema is owned by the
Alembic migrations in `store/migrations`; `store.migrate.upgrade` brings a database of
either kind up to date in place before anything uses it.

Two front doors to the same queries:
- `AsyncDatabase`, awaited by the API on its event loop;
- `Database`, a blocking wrapper for the sync activities running on worker threads (and
  for scripts): it runs the same coroutines on a private event loop thread, so the sync
  code never owns an asyncpg connection.

These tables are not contracts: the API maps them to `schemas` models before they leave.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, func, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from schemas.run_spec import RunSpec
from schemas.run_state import RunState
from store.engine import make_engine


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
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
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    # seq orders the workflow's own events and makes their recording idempotent;
    # progress events from training have none.
    seq: int | None = None
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


class AsyncDatabase:
    """The service's queries, awaited on the caller's event loop."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)

    def session(self) -> AsyncSession:
        return AsyncSession(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("select 1"))

    # projects

    async def ensure_project(self, project: str, created_by: str | None = None) -> ProjectRow:
        """The project row, made on first use (runs and uploads name projects freely)."""
        async with self.session() as s:
            row = await s.get(ProjectRow, project)
            if row is not None:
                return row
            row = ProjectRow(id=project, display_name=project, created_by=created_by)
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:  # made by a concurrent request
                await s.rollback()
                return await s.get(ProjectRow, project)
            return row

    async def create_project(self, row: ProjectRow) -> bool:
        """Insert a project; False when the id is taken."""
        async with self.session() as s:
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                return False
            return True

    async def get_project(self, project: str) -> ProjectRow | None:
        async with self.session() as s:
            return await s.get(ProjectRow, project)

    async def list_projects(self, only: frozenset[str] | None = None) -> list[ProjectRow]:
        q = select(ProjectRow).order_by(ProjectRow.id)
        if only is not None:
            q = q.where(ProjectRow.id.in_(sorted(only)))
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def update_project(self, project: str, **fields: Any) -> ProjectRow | None:
        async with self.session() as s:
            row = await s.get(ProjectRow, project)
            if row is None:
                return None
            for k, v in fields.items():
                setattr(row, k, v)
            s.add(row)
            await s.commit()
            return row

    # runs

    async def create_run(
        self, run_id: str, spec: RunSpec, created_by: str | None = None, idempotency_key: str | None = None
    ) -> tuple[RunRow, bool]:
        """Insert a run and its first event. With an idempotency key already used in the
        project, return that run instead: (row, created)."""
        await self.ensure_project(spec.project, created_by)
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
            created_by=created_by,
            idempotency_key=idempotency_key,
        )
        async with self.session() as s:
            s.add(row)
            s.add(RunEventRow(run_id=run_id, seq=0, kind="state", state=RunState.queued.value, message="run created"))
            try:
                await s.commit()
            except IntegrityError:
                if idempotency_key is None:
                    raise
                await s.rollback()
                existing = await self.run_by_idempotency_key(spec.project, idempotency_key)
                if existing is None:
                    raise
                return existing, False
        return row, True

    async def run_by_idempotency_key(self, project: str, key: str) -> RunRow | None:
        q = select(RunRow).where(RunRow.project == project, RunRow.idempotency_key == key)
        async with self.session() as s:
            return (await s.exec(q)).first()

    async def get_run(self, run_id: str) -> RunRow | None:
        async with self.session() as s:
            return await s.get(RunRow, run_id)

    async def list_runs(
        self,
        project: str | None = None,
        state: str | None = None,
        limit: int = 100,
        projects: frozenset[str] | None = None,
    ) -> list[RunRow]:
        """Newest first. `projects` limits the answer to those the caller may see."""
        q = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id).limit(limit)
        if project:
            q = q.where(RunRow.project == project)
        if projects is not None:
            q = q.where(RunRow.project.in_(sorted(projects)))
        if state:
            q = q.where(RunRow.state == state)
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def run_counts_by_state(self) -> dict[str, int]:
        q = select(RunRow.state, func.count()).group_by(RunRow.state)
        async with self.session() as s:
            return {state: n for state, n in (await s.exec(q)).all()}

    async def record_state(
        self, run_id: str, seq: int, state: RunState, message: str, data: dict, **fields: Any
    ) -> bool:
        """Record a workflow state transition once; a retried call with the same seq is a no-op."""
        async with self.session() as s:
            seen = (await s.exec(select(RunEventRow).where(RunEventRow.run_id == run_id, RunEventRow.seq == seq))).first()
            if seen is not None:
                return False
            s.add(RunEventRow(run_id=run_id, seq=seq, kind="state", state=state.value, message=message, data=data))
            row = await s.get(RunRow, run_id)
            if row is not None:
                row.state = state.value
                row.updated_at = now()
                for k, v in fields.items():
                    setattr(row, k, v)
                s.add(row)
            try:
                await s.commit()
            except IntegrityError:  # the same seq recorded concurrently by a retried activity
                return False
            return True

    async def record_progress(self, run_id: str, step: int, total_steps: int, loss: float | None, data: dict) -> None:
        async with self.session() as s:
            s.add(RunEventRow(run_id=run_id, kind="progress", step=step, message="", data=data))
            row = await s.get(RunRow, run_id)
            if row is not None:
                row.step, row.total_steps, row.loss, row.updated_at = step, total_steps, loss, now()
                s.add(row)
            await s.commit()

    async def add_event(self, run_id: str, kind: str, message: str, data: dict | None = None) -> None:
        async with self.session() as s:
            s.add(RunEventRow(run_id=run_id, kind=kind, message=message, data=data or {}))
            await s.commit()

    async def events(self, run_id: str, after_id: int = 0, limit: int = 1000, kind: str | None = None) -> list[RunEventRow]:
        q = (
            select(RunEventRow)
            .where(RunEventRow.run_id == run_id, RunEventRow.id > after_id)
            .order_by(RunEventRow.id)
            .limit(limit)
        )
        if kind:
            q = q.where(RunEventRow.kind == kind)
        async with self.session() as s:
            return list((await s.exec(q)).all())

    # datasets

    async def add_dataset(self, row: DatasetRow) -> tuple[DatasetRow, bool]:
        """Insert a dataset unless its project already holds the same bytes: (row, created).
        A concurrent upload of the same file ends with both callers holding one row."""
        existing = await self.dataset_by_sha256(row.project, row.sha256)
        if existing is not None:
            return existing, False
        await self.ensure_project(row.project, row.created_by)
        async with self.session() as s:
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                await s.rollback()
                existing = await self.dataset_by_sha256(row.project, row.sha256)
                if existing is None:
                    raise
                return existing, False
        return row, True

    async def dataset_by_sha256(self, project: str, sha256: str) -> DatasetRow | None:
        q = select(DatasetRow).where(DatasetRow.project == project, DatasetRow.sha256 == sha256)
        async with self.session() as s:
            return (await s.exec(q)).first()

    async def get_dataset(self, dataset_id: str) -> DatasetRow | None:
        """The dataset, also under the id of a duplicate merged into it."""
        async with self.session() as s:
            row = await s.get(DatasetRow, dataset_id)
            if row is None:
                alias = await s.get(DatasetAliasRow, dataset_id)
                if alias is not None:
                    row = await s.get(DatasetRow, alias.dataset_id)
            return row

    async def list_datasets(
        self, project: str | None = None, projects: frozenset[str] | None = None, limit: int = 100
    ) -> list[DatasetRow]:
        """Newest first. `projects` limits the answer to those the caller may see."""
        q = select(DatasetRow).order_by(DatasetRow.created_at.desc(), DatasetRow.id).limit(limit)
        if project:
            q = q.where(DatasetRow.project == project)
        if projects is not None:
            q = q.where(DatasetRow.project.in_(sorted(projects)))
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def runs_using_datasets(self, dataset_ids: list[str]) -> dict[str, list[RunRow]]:
        """dataset id → the runs that name it, oldest first."""
        if not dataset_ids:
            return {}
        q = select(RunRow).where(RunRow.dataset.in_(sorted(set(dataset_ids)))).order_by(RunRow.created_at, RunRow.id)
        out: dict[str, list[RunRow]] = {i: [] for i in dataset_ids}
        async with self.session() as s:
            for run in (await s.exec(q)).all():
                out[run.dataset].append(run)
        return out

    async def delete_dataset(self, dataset_id: str) -> bool:
        """Delete the dataset's row and its aliases; True when its stored file is now used
        by no dataset of any project (the caller may delete it). False when there is no such dataset."""
        async with self.session() as s:
            row = await s.get(DatasetRow, dataset_id)
            if row is None:
                return False
            for alias in (await s.exec(select(DatasetAliasRow).where(DatasetAliasRow.dataset_id == dataset_id))).all():
                await s.delete(alias)
            await s.delete(row)
            await s.commit()
            others = (await s.exec(select(DatasetRow.id).where(DatasetRow.store_key == row.store_key))).first()
            return others is None

    # artifacts

    async def add_artifact(self, row: ArtifactRow) -> None:
        async with self.session() as s:
            if await s.get(ArtifactRow, row.id) is None:
                s.add(row)
                try:
                    await s.commit()
                except IntegrityError:  # recorded by a concurrent retry
                    pass

    async def artifacts(self, run_id: str) -> list[ArtifactRow]:
        q = select(ArtifactRow).where(ArtifactRow.run_id == run_id).order_by(ArtifactRow.created_at)
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def get_artifact(self, artifact_id: str) -> ArtifactRow | None:
        async with self.session() as s:
            return await s.get(ArtifactRow, artifact_id)

    # consents

    async def add_consent(self, row: ConsentRow) -> ConsentRow:
        await self.ensure_project(row.project, row.recorded_by)
        async with self.session() as s:
            s.add(row)
            await s.commit()
        return row

    async def consents(self, project: str, include_revoked: bool = True) -> list[ConsentRow]:
        q = select(ConsentRow).where(ConsentRow.project == project).order_by(ConsentRow.created_at)
        if not include_revoked:
            q = q.where(ConsentRow.revoked_at.is_(None))
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def get_consent(self, consent_id: str) -> ConsentRow | None:
        async with self.session() as s:
            return await s.get(ConsentRow, consent_id)

    async def revoke_consent(self, consent_id: str, by: str | None) -> ConsentRow | None:
        async with self.session() as s:
            row = await s.get(ConsentRow, consent_id)
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at, row.revoked_by = now(), by
                s.add(row)
                await s.commit()
            return row

    # publish targets

    async def add_publish_target(self, row: PublishTargetRow) -> bool:
        """Insert a target; False when the project already has one with that name."""
        await self.ensure_project(row.project, row.created_by)
        async with self.session() as s:
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                return False
            return True

    async def publish_targets(self, project: str) -> list[PublishTargetRow]:
        q = select(PublishTargetRow).where(PublishTargetRow.project == project).order_by(PublishTargetRow.name)
        async with self.session() as s:
            return list((await s.exec(q)).all())

    async def get_publish_target(self, target_id: str) -> PublishTargetRow | None:
        async with self.session() as s:
            return await s.get(PublishTargetRow, target_id)

    async def delete_publish_target(self, target_id: str) -> bool:
        async with self.session() as s:
            row = await s.get(PublishTargetRow, target_id)
            if row is None:
                return False
            await s.delete(row)
            await s.commit()
            return True


class Database:
    """Blocking access for sync code (activities on worker threads, scripts, tests).

    Every `AsyncDatabase` query is available under the same name; each call runs on this
    object's own event loop thread and waits for the answer. Opening one migrates the
    database to the newest schema first, unless told not to.
    """

    def __init__(self, url: str, migrate: bool = True):
        if migrate:
            from store.migrate import upgrade

            upgrade(url)
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lockn-tune-db", daemon=True)
        self._thread.start()
        self.aio = self._run(_make_async(url))

    def _run(self, coro: Awaitable):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(AsyncDatabase, name, None)
        if method is None or not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)
        bound = getattr(self.aio, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(bound(*args, **kwargs))

        call.__doc__ = method.__doc__
        return call

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _make_async(url: str) -> AsyncDatabase:
    return AsyncDatabase(url)
