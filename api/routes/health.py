"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import DbDep
from runtime.temporal import connect
from schemas.api import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz(request: Request, db: DbDep):
    """200 when the database and Temporal answer; 503 with what is down otherwise."""
    try:
        await db.ping()
        database = "ok"
    except Exception as exc:
        database = f"error: {exc}"
    state = request.app.state
    try:
        client = state.temporal or await connect(state.settings, tracer_provider=state.tracer_provider)
        state.temporal = client
        await client.service_client.check_health()
        temporal = "ok"
    except Exception as exc:
        temporal = f"unreachable: {exc}"
    ok = database == "ok" and temporal == "ok"
    body = Health(status="ok" if ok else "degraded", database=database, temporal=temporal)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
