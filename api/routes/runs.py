"""Runs: start, list, read, cancel, and follow as server-sent events."""

from __future__ import annotations

import asyncio
import json

import structlog
from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from api.deps import DbDep, SettingsDep, TemporalDep
from schemas import search_attributes as sa
from schemas.activities import RunInput
from schemas.api import ArtifactView, EventView, RunList, RunView
from schemas.preflight import PreflightReport
from schemas.run_spec import RunSpec
from schemas.run_state import RunState, RunStatus
from schemas.settings import Settings
from store.db import Database, RunRow, new_id

router = APIRouter(prefix="/v1/runs", tags=["runs"])
log = structlog.get_logger(__name__)


def to_view(row: RunRow, settings: Settings, db: Database | None = None) -> RunView:
    progress = min(1.0, row.step / row.total_steps) if row.total_steps else 0.0
    if row.state == RunState.succeeded.value:
        progress = 1.0
    artifacts = [ArtifactView(**a.model_dump()) for a in db.artifacts(row.id)] if db else []
    return RunView(
        **row.model_dump(),
        progress=round(progress, 4),
        temporal_ui_url=settings.run_ui_url(row.id),
        artifacts=artifacts,
    )


def _get(db: Database, run_id: str) -> RunRow:
    row = db.get_run(run_id)
    if row is None:
        raise HTTPException(404, f"run {run_id!r} not found")
    return row


async def start_run_workflow(client: Client, settings: Settings, run_id: str, spec: RunSpec):
    """Start TuneLLM for a run already recorded in the DB; workflow id = run id."""
    return await client.start_workflow(
        "TuneLLM",
        RunInput(
            run_id=run_id,
            spec=spec,
            cpu_task_queue=settings.cpu_task_queue,
            gpu_task_queue=settings.gpu_task_queue,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        ),
        id=run_id,
        task_queue=settings.cpu_task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.KIND, spec.kind),
                SearchAttributePair(sa.PROJECT, spec.project),
                SearchAttributePair(sa.BASE_MODEL, spec.base_model[:250]),
                SearchAttributePair(sa.STATE, RunState.queued.value),
            ]
        ),
    )


@router.post("", status_code=201, response_model=RunView)
async def create_run(spec: RunSpec, settings: SettingsDep, db: DbDep, client: TemporalDep) -> RunView:
    """Start a tuning run. The body is the run spec; every field but base_model and dataset has a default."""
    if spec.dataset.startswith("ds_") and db.get_dataset(spec.dataset) is None:
        raise HTTPException(422, f"dataset {spec.dataset!r} not found; upload it with POST /v1/datasets first")
    run_id = new_id("run")
    row = await run_in_threadpool(db.create_run, run_id, spec)
    try:
        await start_run_workflow(client, settings, run_id, spec)
    except RPCError as exc:
        reason = f"could not start the workflow on Temporal ({exc.message}); is the stack running?"
        db.record_state(run_id, 1, RunState.failed, reason, {}, error=reason)
        raise HTTPException(503, reason) from None
    log.info("run.started", run_id=run_id, project=spec.project, base_model=spec.base_model)
    return to_view(row, settings)


@router.get("", response_model=RunList)
def list_runs(
    settings: SettingsDep,
    db: DbDep,
    project: str | None = Query(None, description="Only runs of this project."),
    state: RunState | None = Query(None, description="Only runs in this state."),
    limit: int = Query(100, ge=1, le=1000),
) -> RunList:
    """Runs, newest first."""
    rows = db.list_runs(project=project, state=state.value if state else None, limit=limit)
    return RunList(runs=[to_view(r, settings) for r in rows])


@router.get("/{run_id}", response_model=RunView)
def get_run(run_id: str, settings: SettingsDep, db: DbDep) -> RunView:
    """State, progress, metrics (baseline and tuned eval loss) and artifacts of a run."""
    return to_view(_get(db, run_id), settings, db)


@router.post("/{run_id}/cancel", status_code=202, response_model=RunView)
async def cancel_run(run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep) -> RunView:
    """Ask the run to stop. A training chunk finishes its step and checkpoints first; the run
    then ends `cancelled`."""
    row = _get(db, run_id)
    if RunState(row.state).terminal:
        raise HTTPException(409, f"run {run_id} already ended ({row.state}); nothing to cancel")
    try:
        await client.get_workflow_handle(run_id).cancel()
    except RPCError as exc:
        raise HTTPException(503, f"could not cancel on Temporal: {exc.message}") from None
    db.add_event(run_id, "info", "cancellation requested")
    return to_view(_get(db, run_id), settings, db)


async def _update(client: Client, db: Database, run_id: str, update: str, what: str) -> None:
    row = _get(db, run_id)
    if RunState(row.state).terminal:
        raise HTTPException(409, f"run {run_id} already ended ({row.state}); nothing to {what}")
    try:
        await client.get_workflow_handle(run_id).execute_update(update, result_type=RunStatus)
    except WorkflowUpdateFailedError as exc:
        raise HTTPException(409, f"cannot {what} run {run_id}: {getattr(exc.cause, 'message', exc.cause)}") from None
    except RPCError as exc:
        raise HTTPException(503, f"could not {what} on Temporal: {exc.message}") from None
    db.add_event(run_id, "info", f"{what} requested")


@router.post("/{run_id}/pause", status_code=202, response_model=RunView)
async def pause_run(run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep) -> RunView:
    """Pause a run: the chunk in flight finishes its step, checkpoints and frees the GPU;
    the run waits in `paused` until resumed."""
    await _update(client, db, run_id, "pause_run", "pause")
    return to_view(_get(db, run_id), settings, db)


@router.post("/{run_id}/resume", status_code=202, response_model=RunView)
async def resume_run(run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep) -> RunView:
    """Resume a paused run from its newest checkpoint."""
    await _update(client, db, run_id, "resume_run", "resume")
    return to_view(_get(db, run_id), settings, db)


@router.get("/{run_id}/preflight", response_model=PreflightReport)
def get_preflight(run_id: str, db: DbDep) -> PreflightReport:
    """The run's preflight report: plan, hardware, memory, dataset checks and every default with why."""
    _get(db, run_id)
    reports = [e for e in db.events(run_id) if e.kind == "preflight"]
    if not reports:
        raise HTTPException(404, f"run {run_id} has no preflight report yet (it is {db.get_run(run_id).state})")
    return PreflightReport.model_validate(reports[-1].data)


def _sse(ev) -> str:
    view = EventView(**ev.model_dump())
    return f"id: {view.id}\nevent: {view.kind}\ndata: {view.model_dump_json()}\n\n"


@router.get(
    "/{run_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events, one per run event."}},
)
async def run_events(
    run_id: str,
    db: DbDep,
    follow: bool = Query(True, description="Keep the stream open until the run ends."),
    last_event_id: int = Header(0, alias="Last-Event-ID", ge=0, description="Resume after this event id."),
) -> StreamingResponse:
    """The run's events as server-sent events: state transitions, training progress (step,
    loss), warnings. With follow, the stream ends after the run's final state."""
    _get(db, run_id)

    async def stream():
        after = last_event_id
        idle = 0
        while True:
            events = await run_in_threadpool(db.events, run_id, after)
            for ev in events:
                after = ev.id
                yield _sse(ev)
            row = await run_in_threadpool(db.get_run, run_id)
            ended = RunState(row.state).terminal
            if not follow or (ended and not events):
                yield f"event: end\ndata: {json.dumps({'state': row.state})}\n\n"
                return
            idle = idle + 1 if not events else 0
            if idle and idle % 30 == 0:
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
