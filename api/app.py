"""The LockN Tune HTTP API (FastAPI). OpenAPI docs at /docs.

Run: `uvicorn api.app:create_app --factory --port 8420` (or let `lockn-tune up` start it).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib.resources import files

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import TracerProvider

from api.auth import TokenVerifier, current_principal
from api.body_limit import BodyLimitMiddleware
from api.errors import ERRORS
from schemas.api import ErrorView
from api.routes import artifacts, datasets, health, models, preflight, projects, runs
from runtime import metrics
from runtime.logs import configure_logging
from runtime.telemetry import configure_tracing
from schemas.settings import Settings
from store.db import AsyncDatabase
from store.migrate import upgrade
from store.open_store import open_store

log = structlog.get_logger(__name__)

JSON_BODY_LIMIT = 1024 * 1024
# Swagger UI and ReDoc come from the fastapi-offline package, served by this app: /docs
# works on a machine without internet (FastAPI's defaults load them from a CDN).
DOCS_ASSETS_URL = "/docs-assets"
DOCS_ASSETS_DIR = files("fastapi_offline") / "static"


def create_app(settings: Settings | None = None, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The API. tracer_provider defaults to this process's global one (exporting to
    LOCKN_TUNE_OTLP_ENDPOINT when set); tests pass their own."""
    settings = settings or Settings()
    configure_logging("api", settings)
    tracer_provider = tracer_provider or configure_tracing("api", settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_enabled:
            log.warning(
                "api.auth_off",
                message="auth is off: every caller is the local user with admin on every project. "
                "Set LOCKN_TUNE_AUTH_ENABLED=true with LOCKN_TUNE_OIDC_ISSUER and LOCKN_TUNE_OIDC_AUDIENCE "
                "before exposing this API beyond this machine.",
            )
        yield
        await app.state.db.close()
        tracer_provider.force_flush(5000)  # spans still batched for the collector; a dead one must not hold up exit

    app = FastAPI(
        title="LockN Tune",
        version="0.1.0",
        description="Fine-tune LLMs with LoRA/QLoRA as durable Temporal workflows.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    app.state.settings = settings
    if settings.auth_enabled:
        # Refuse to start half-configured (no issuer or audience), rather than 500 on every request.
        app.state.token_verifier = TokenVerifier(settings)
    if settings.db_auto_migrate:
        upgrade(settings.db_url)
    app.state.db = AsyncDatabase(settings.db_url)
    app.state.store = open_store(settings)
    app.state.temporal = None
    app.state.temporal_lock = asyncio.Lock()
    app.state.tracer_provider = tracer_provider
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=JSON_BODY_LIMIT,
        limits={"/v1/datasets": settings.max_upload_bytes},
    )
    app.add_middleware(metrics.HttpRequestMetrics)  # outside the body limit, so 413s count too
    # One span per request: no span per ASGI message (an SSE stream would make one per event).
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider, excluded_urls="/metrics$", exclude_spans=["receive", "send"]
    )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus scrape: request durations, runs by state (read from the DB now), process metrics."""
        try:
            metrics.set_run_counts(await request.app.state.db.run_counts_by_state())
        except Exception as exc:  # a DB outage must not hide the API's own metrics
            log.warning("metrics.run_counts_failed", error=str(exc))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    add_offline_docs(app)
    app.include_router(health.router)
    app.include_router(runs.router, responses=ERRORS)
    app.include_router(datasets.router, responses={**ERRORS, 413: {"model": ErrorView, "description": "Upload too large"}})
    app.include_router(artifacts.router, responses=ERRORS)
    app.include_router(projects.router, responses=ERRORS)
    # Any signed-in caller may read the model matrix; it holds nothing of any project.
    app.include_router(models.router, dependencies=[Depends(current_principal)], responses=ERRORS)
    app.include_router(preflight.router, responses=ERRORS)
    return app


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc) with every script, style and icon served from
    DOCS_ASSETS_URL, so the pages reference no host but this app's."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(DOCS_ASSETS_DIR)), name="docs-assets")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            # No badge that sends the spec to the public validator.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
