"""Blocking access to the metadata DB for sync code: activities on worker threads, scripts, tests.

`BlockingDatabase` owns an `AsyncDatabase` and an event loop thread of its own, and runs the
queries there, so sync code never owns an asyncpg connection and the API's loop is never
borrowed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from schemas.run_spec import RunSpec
from schemas.run_state import RunState
from store.db import AsyncDatabase
from store.migrate import upgrade
from store.tables import ArtifactRow, DatasetRow, RunEventRow, RunRow

T = TypeVar("T")


class BlockingDatabase:
    """The blocking form of `AsyncDatabase`; opening one migrates the database to the newest
    schema first, unless told not to.

    Design: one explicit method for each query that sync code calls, delegating in one line to
    the `AsyncDatabase` query of the same name, so go-to-definition
    and type checkers follow every call; any other query runs through `run(db.aio.query(...))`.
    """

    def __init__(self, url: str, migrate: bool = True):
        if migrate:
            upgrade(url)
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lockn-tune-db", daemon=True)
        self._thread.start()
        self.aio: AsyncDatabase = self.run(_open(url))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine (a query of `self.aio`) on this object's loop and wait for its answer."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # runs and their events

    def create_run(
        self, run_id: str, spec: RunSpec, created_by: str | None = None, idempotency_key: str | None = None
    ) -> tuple[RunRow, bool]:
        return self.run(self.aio.create_run(run_id, spec, created_by, idempotency_key))

    def get_run(self, run_id: str) -> RunRow | None:
        return self.run(self.aio.get_run(run_id))

    def record_state(
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
        return self.run(self.aio.record_state(run_id, seq, state, message, data, key=key, **fields))

    def record_progress(
        self, run_id: str, step: int, total_steps: int, loss: float | None, data: dict, *, key: str | None = None
    ) -> bool:
        return self.run(self.aio.record_progress(run_id, step, total_steps, loss, data, key=key))

    def add_event(self, run_id: str, kind: str, message: str, data: dict | None = None, *, key: str | None = None) -> bool:
        return self.run(self.aio.add_event(run_id, kind, message, data, key=key))

    def events(self, run_id: str, after_id: int = 0, limit: int = 1000, kind: str | None = None) -> list[RunEventRow]:
        return self.run(self.aio.events(run_id, after_id, limit, kind))

    # datasets

    def add_dataset(self, row: DatasetRow) -> tuple[DatasetRow, bool]:
        return self.run(self.aio.add_dataset(row))

    def get_dataset(self, dataset_id: str) -> DatasetRow | None:
        return self.run(self.aio.get_dataset(dataset_id))

    # artifacts

    def add_artifact(self, row: ArtifactRow) -> None:
        return self.run(self.aio.add_artifact(row))

    def get_artifact(self, artifact_id: str) -> ArtifactRow | None:
        return self.run(self.aio.get_artifact(artifact_id))


async def _open(url: str) -> AsyncDatabase:
    """Made on the loop that will use it: the engine's connections belong to that loop."""
    return AsyncDatabase(url)
