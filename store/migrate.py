"""Alembic migrations for the metadata DB, run in place on SQLite or PostgreSQL.

`upgrade(url)` is safe to call from every process at start-up: processes take turns
(a file lock beside a SQLite file, an advisory lock on PostgreSQL), and a database that
is already at head costs one query. A database made before migrations existed (the
embedded stack's `create_all` schema) is recognised and stamped at the first revision.

Operators run it by hand with `lockn-tune db upgrade` (compose and Kubernetes run that
as a one-shot job before the API and workers start).
"""

from __future__ import annotations

import fcntl
import threading
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from store.engine import async_url, is_sqlite, make_engine

MIGRATIONS = Path(__file__).parent / "migrations"
# First revision: the schema the embedded stack created before Alembic.
BASELINE = "0001"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config is an ini parser: a '%' in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    cfg.attributes["baseline"] = BASELINE
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


# Alembic's `context` is module-global: in one process, migrations take turns.
_ALEMBIC_IN_USE = threading.Lock()


def _in_thread(fn, *args) -> None:
    """Alembic's env runs its own event loop: give it a thread of its own, so callers
    already inside an event loop (the API, async tests) can migrate too."""
    errors: list[BaseException] = []

    def target():
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    with _ALEMBIC_IN_USE:
        t = threading.Thread(target=target, name="lockn-tune-migrate")
        t.start()
        t.join()
    if errors:
        raise errors[0]


@contextmanager
def _sqlite_file_lock(url: str):
    path = url.split("///", 1)[-1] if "///" in url else ""
    if not path or path == ":memory:":
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".migrate-lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at url to `revision` (default: newest)."""
    cfg = alembic_config(url)
    if is_sqlite(url):
        with _sqlite_file_lock(url):
            _in_thread(command.upgrade, cfg, revision)
    else:
        _in_thread(command.upgrade, cfg, revision)  # env.py holds an advisory lock


def downgrade(url: str, revision: str) -> None:
    cfg = alembic_config(url)
    if is_sqlite(url):
        with _sqlite_file_lock(url):
            _in_thread(command.downgrade, cfg, revision)
    else:
        _in_thread(command.downgrade, cfg, revision)


def current(url: str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    import asyncio

    from sqlalchemy import inspect, text

    async def read() -> str | None:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                has = await conn.run_sync(lambda c: inspect(c).has_table("alembic_version"))
                if not has:
                    return None
                return (await conn.execute(text("select version_num from alembic_version"))).scalar()
        finally:
            await engine.dispose()

    out: list[str | None] = []
    _in_thread(lambda: out.append(asyncio.run(read())))
    return out[0]
