"""The metadata DB's queries: projects, runs and their events, datasets, artifacts, consents,
publish targets.

`AsyncDatabase` runs them over SQLAlchemy's asyncio engine: a SQLite file through aiosqlite
in the embedded stack, PostgreSQL through asyncpg in production. The API awaits it on its
event loop; sync code (activities on worker threads, scripts) goes through
`store.blocking.BlockingDatabase`, which runs the same queries on a loop of its own.

The tables are in store/tables.py; the schema is owned by the Alembic migrations in
`store/migrations`, and `store.migrate.upgrade` brings a database up to date in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, or_, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from schemas.run_spec import RunSpec
from schemas.run_state import RunState
from store.engine import make_engine
from store.tables import (
    ArtifactRow,
    ConsentRow,
    DatasetAliasRow,
    DatasetRow,
    ProjectRow,
    PublishTargetRow,
    RunEventRow,
    RunRow,
    now,
)


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

    # run events

    async def record_state(
        self,
        run_id: str,
        seq: int | None,
        state: RunState,
        message: str,
        data: dict,
        *,
        key: str | None = None,
        **fields: Any,
    ) -> bool:
        """Record a workflow state transition once: a retried call with the same seq or key is
        a no-op returning False. A writer outside the workflow (the API recording a start that
        failed) gives a key and no seq, so it never takes one of the workflow's numbers."""
        if seq is None and key is None:
            raise ValueError("record_state needs a seq or a key, or a retried call would record the state twice")

        def update(row: RunRow) -> None:
            row.state = state.value
            for k, v in fields.items():
                setattr(row, k, v)

        event = RunEventRow(run_id=run_id, seq=seq, key=key, kind="state", state=state.value, message=message, data=data)
        return await self._add_event_once(event, update)

    async def record_progress(
        self, run_id: str, step: int, total_steps: int, loss: float | None, data: dict, *, key: str | None = None
    ) -> bool:
        """Record a training progress event and copy step, total_steps and loss onto the run;
        with a key the run already has an event under, change nothing and return False."""

        def update(row: RunRow) -> None:
            row.step, row.total_steps, row.loss = step, total_steps, loss

        event = RunEventRow(run_id=run_id, key=key, kind="progress", step=step, message="", data=data)
        return await self._add_event_once(event, update)

    async def add_event(
        self, run_id: str, kind: str, message: str, data: dict | None = None, *, key: str | None = None
    ) -> bool:
        """Record an event; with a key the run already has an event under, a no-op returning False."""
        return await self._add_event_once(RunEventRow(run_id=run_id, key=key, kind=kind, message=message, data=data or {}))

    async def _add_event_once(self, event: RunEventRow, update: Callable[[RunRow], None] | None = None) -> bool:
        """Insert `event` and apply `update` to its run (stamping updated_at) in one transaction,
        unless the run already has an event with the event's seq or key: then change nothing
        and return False. A concurrent writer of the same seq or key loses on the unique index."""
        same = []
        if event.seq is not None:
            same.append(RunEventRow.seq == event.seq)
        if event.key is not None:
            same.append(RunEventRow.key == event.key)
        async with self.session() as s:
            if same:
                seen = (await s.exec(select(RunEventRow.id).where(RunEventRow.run_id == event.run_id, or_(*same)))).first()
                if seen is not None:
                    return False
            # Read the run before adding the event: a read flushes pending rows, and a
            # concurrent writer's unique violation must surface at the commit below.
            if update is not None and (row := await s.get(RunRow, event.run_id)) is not None:
                row.updated_at = now()
                update(row)
                s.add(row)
            s.add(event)
            try:
                await s.commit()
            except IntegrityError:  # the same seq or key written concurrently by a retried activity
                if not same:
                    raise
                return False
            return True

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
