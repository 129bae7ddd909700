"""Alembic migrations on SQLite and PostgreSQL: fresh databases, in-place upgrades of
existing ones (the pre-Alembic embedded schema included), and schema == models."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from schemas.run_spec import RunSpec
from schemas.run_state import RunState
from store.blocking import BlockingDatabase
from store.migrate import current, downgrade, head, upgrade

LEGACY_SQL = Path(__file__).parent / "fixtures" / "legacy_embedded_db.sql"


def sync_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://") if url.startswith("postgresql") else url


def schema_diff(url: str) -> list:
    """Differences between the migrated database and the SQLModel tables."""
    import asyncio

    from store.engine import make_engine

    async def diff():
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), SQLModel.metadata)
                )
        finally:
            await engine.dispose()

    return asyncio.run(diff())


def spec(project: str = "acme") -> RunSpec:
    return RunSpec.model_validate({"project": project, "name": "r", "base_model": "/m", "dataset": "/d.jsonl"})


def test_fresh_database_matches_the_models(db_url):
    upgrade(db_url)
    assert current(db_url) == head()
    assert schema_diff(db_url) == []
    # Migrating again is a no-op, as every process does at start-up.
    upgrade(db_url)
    assert current(db_url) == head()


def test_upgrade_in_place_keeps_runs_and_backfills_projects(db_url):
    upgrade(db_url, "0001")
    old = BlockingDatabase(db_url, migrate=False)
    try:
        # Write through the baseline columns only, as the old code did.
        import asyncio  # noqa: F401

        from sqlalchemy import text

        async def seed():
            async with old.aio.engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO runs (id, project, name, kind, method, base_model, dataset, state, spec, spec_sha256,"
                        " created_at, updated_at, step) VALUES ('run_old', 'acme', 'r', 'llm', 'lora', '/m', '/d', "
                        "'training', '{}', 'x', 1, 1, 7)"
                    )
                )

        old.run(seed())
    finally:
        old.close()
    upgrade(db_url)
    assert current(db_url) == head()
    db = BlockingDatabase(db_url)
    try:
        row = db.get_run("run_old")
        assert (row.state, row.step, row.project) == ("training", 7, "acme")
        assert [p.id for p in db.run(db.aio.list_projects())] == ["acme"]
        # The new columns work on the upgraded table.
        _, made = db.create_run("run_new", spec(), created_by="alice", idempotency_key="k1")
        again, made_again = db.create_run("run_other", spec(), created_by="alice", idempotency_key="k1")
        assert made and not made_again and again.id == "run_new"
    finally:
        db.close()
    assert schema_diff(db_url) == []


def test_duplicate_uploads_are_merged_into_one_dataset_whose_old_ids_still_resolve(db_url):
    """Before 0003 every upload of the same file made a new dataset; upgrading merges them."""
    from sqlalchemy import text

    upgrade(db_url, "0002")
    old = BlockingDatabase(db_url, migrate=False)
    try:
        async def seed():
            async with old.aio.engine.begin() as conn:
                for ds_id, project, sha, created in [
                    ("ds_first", "acme", "a" * 64, 1), ("ds_again", "acme", "a" * 64, 2),
                    ("ds_other", "beta", "a" * 64, 3), ("ds_diff", "acme", "b" * 64, 4),
                ]:
                    await conn.execute(text(
                        "INSERT INTO datasets (id, project, name, sha256, size_bytes, shape, total_rows, valid_rows,"
                        " bad_rows, store_key, report, created_at) VALUES (:id, :p, 'd.jsonl', :sha, 1, 'chat', 1, 1,"
                        " 0, 'datasets/sha256/x.jsonl', '{}', :c)"), {"id": ds_id, "p": project, "sha": sha, "c": created})
                await conn.execute(text(
                    "INSERT INTO runs (id, project, name, kind, method, base_model, dataset, state, spec, spec_sha256,"
                    " created_at, updated_at, step) VALUES ('run_dup', 'acme', 'r', 'llm', 'lora', '/m', 'ds_again',"
                    " 'succeeded', '{}', 'x', 1, 1, 7)"))

        old.run(seed())
    finally:
        old.close()
    upgrade(db_url)
    db = BlockingDatabase(db_url)
    try:
        assert sorted(d.id for d in db.run(db.aio.list_datasets())) == ["ds_diff", "ds_first", "ds_other"]
        assert db.get_dataset("ds_again").id == "ds_first"
        assert db.get_run("run_dup").dataset == "ds_first"
        assert [r.id for r in db.run(db.aio.runs_using_datasets(["ds_first"]))["ds_first"]] == ["run_dup"]
    finally:
        db.close()
    assert schema_diff(db_url) == []


def test_downgrade_to_baseline_and_back(db_url):
    upgrade(db_url)
    downgrade(db_url, "0001")
    assert current(db_url) == "0001"
    upgrade(db_url)
    assert current(db_url) == head()


def test_pre_alembic_embedded_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "lockn-tune.db"
    con = sqlite3.connect(path)
    con.executescript(LEGACY_SQL.read_text())
    con.close()
    url = f"sqlite:///{path}"
    db = BlockingDatabase(url)  # opening migrates
    try:
        assert current(url) == head()
        run = db.get_run("run_legacy0000000001")
        assert run.state == RunState.preflight.value and run.step == 5 and run.loss == 2.5
        assert [e.seq for e in db.events("run_legacy0000000001")] == [0, 1, None]
        assert db.get_dataset("ds_0123456789abcdef").project == "legacy"
        assert [a.id for a in db.run(db.aio.artifacts("run_legacy0000000001"))] == ["art_1"]
        assert [p.id for p in db.run(db.aio.list_projects())] == ["legacy"]
    finally:
        db.close()
    assert schema_diff(url) == []


def test_concurrent_openers_migrate_once(db_url):
    """API and both workers open the same fresh database at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: upgrade(db_url), range(4)))
    assert current(db_url) == head()
    assert schema_diff(db_url) == []
