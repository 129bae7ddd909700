"""The LockN Tune HTTP API (FastAPI). OpenAPI docs at /docs.

Run: `uvicorn api.app:create_app --factory --port 8420` (or let `lockn-tune up` start it).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.body_limit import BodyLimitMiddleware
from api.routes import datasets, health, models, preflight, runs
from schemas.settings import Settings
from store.artifacts import open_store
from store.db import Database

JSON_BODY_LIMIT = 1024 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.db.engine.dispose()

    app = FastAPI(
        title="LockN Tune",
        version="0.1.0",
        description="Fine-tune LLMs with LoRA/QLoRA as durable Temporal workflows.",
        lifespan=lifespan,
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    app.state.settings = settings
    app.state.db = Database(settings.db_url)
    app.state.store = open_store(settings)
    app.state.temporal = None
    app.state.temporal_lock = asyncio.Lock()
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=JSON_BODY_LIMIT,
        limits={"/v1/datasets": settings.max_upload_bytes},
    )
    app.include_router(health.router)
    app.include_router(runs.router)
    app.include_router(datasets.router)
    app.include_router(models.router)
    app.include_router(preflight.router)
    return app
