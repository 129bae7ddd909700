"""Runs: start, list, read, cancel, and follow as server-sent events."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.base_model import local_model_dir
from activities.local_paths import PathRefused, allowed_path, allowed_roots
from api.deps import DbDep, PrincipalDep, Role, SettingsDep, StoreDep, TemporalDep
from api.errors import errors_as_json
from schemas import search_attributes as sa
from schemas.activities import (
    CheckpointRef,
    DatasetSnapshot,
    EvalResult,
    PartialAdapter,
    PublishCheckpointInput,
    PublishInput,
    PublishResult,
    RunInput,
    TrainingPlan,
)
from schemas.api import ArtifactDetail, ArtifactView, CheckpointPublishView, EventView, RunList, RunView
from schemas.preflight import PreflightReport
from schemas.run_spec import RunSpec
from schemas.run_state import RunState, RunStatus
from schemas.settings import Settings
from store.artifacts import ArtifactStore
from store.checkpoints import committed_steps
from store.db import AsyncDatabase
from store.layout import checkpoint_manifest_key
from store.tables import RunRow, new_id

router = APIRouter(prefix="/v1/runs", tags=["runs"])
log = structlog.get_logger(__name__)


def to_view(row: RunRow, settings: Settings, artifacts: list | None = None) -> RunView:
    progress = min(1.0, row.step / row.total_steps) if row.total_steps else 0.0
    if row.state == RunState.succeeded.value:
        progress = 1.0
    return RunView(
        **row.model_dump(),
        progress=round(progress, 4),
        temporal_ui_url=settings.run_ui_url(row.id),
        artifacts=[ArtifactView(**a.model_dump()) for a in artifacts or []],
    )


async def full_view(db: AsyncDatabase, row: RunRow, settings: Settings) -> RunView:
    return to_view(row, settings, await db.artifacts(row.id))


async def get_visible_run(db: AsyncDatabase, principal, run_id: str, role: Role = Role.viewer) -> RunRow:
    """The run, if the caller holds `role` in its project. A run in a project the caller has
    no role in is 'not found', exactly like a run that does not exist."""
    row = await db.get_run(run_id)
    if row is None:
        raise HTTPException(404, f"run {run_id!r} not found")
    principal.require(row.project, role, f"run {run_id!r}")
    return row


async def check_dataset(db: AsyncDatabase, settings: Settings, principal, spec: RunSpec) -> None:
    """The spec's data (dataset, and eval_dataset when given) must be data the caller may use:
    an uploaded dataset of the same project, or (auth off only) a file under the allowed roots;
    a local base_model must be under the allowed roots too (activities/local_paths.py). Checked
    before any workflow starts, so a refused path is never opened; a 422 names the field."""
    roots = allowed_roots(settings)
    for field in ("dataset", "eval_dataset"):
        value = getattr(spec, field, None)
        if value is None:
            continue
        if value.startswith("ds_"):
            ds = await db.get_dataset(value)
            if ds is None or ds.project != spec.project or not principal.can(ds.project, Role.viewer):
                raise HTTPException(
                    422,
                    f"{field} {value!r} not found in project {spec.project!r}; "
                    "upload it with POST /v1/datasets?project=" + spec.project,
                )
        elif settings.auth_enabled:
            raise HTTPException(
                422,
                f"{field} {value!r}: with auth on, a run names an uploaded dataset by id (ds_...), not a path "
                "on the server; upload it with POST /v1/datasets first",
            )
        else:
            try:
                allowed_path(value, field, roots)
            except PathRefused as exc:
                raise HTTPException(422, str(exc)) from None
    try:
        local_model_dir(spec.base_model, roots)
    except PathRefused as exc:
        raise HTTPException(422, str(exc)) from None


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


@router.post("", status_code=201, response_model=RunView, responses={200: {"model": RunView}})
async def create_run(
    spec: RunSpec,
    response: Response,
    settings: SettingsDep,
    db: DbDep,
    client: TemporalDep,
    principal: PrincipalDep,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        max_length=200,
        description="Retry-safe submission: a second request with the same key in the project returns the first "
        "run (200) instead of starting another.",
    ),
) -> RunView:
    """Start a tuning run (operator). The body is the run spec; every field but base_model and
    dataset has a default."""
    principal.require(spec.project, Role.operator, f"project {spec.project!r}")
    await check_dataset(db, settings, principal, spec)
    run_id = new_id("run")
    row, created = await db.create_run(run_id, spec, created_by=principal.subject, idempotency_key=idempotency_key)
    if not created:
        if row.spec_sha256 != spec.sha256():
            raise HTTPException(
                409, f"Idempotency-Key {idempotency_key!r} was already used for run {row.id} with a different spec"
            )
        run_id = row.id
        response.status_code = 200
        if RunState(row.state).terminal:
            return to_view(row, settings)
    try:
        await start_run_workflow(client, settings, run_id, spec)
    except WorkflowAlreadyStartedError:
        pass  # a retried submission: the run's workflow is already running
    except RPCError as exc:
        reason = f"could not start the workflow on Temporal ({exc.message}); is the stack running?"
        # Keyed, not numbered: should the workflow have started after all, its own events keep their seq.
        await db.record_state(run_id, None, RunState.failed, reason, {}, key="start-failed", error=reason)
        raise HTTPException(503, reason) from None
    log.info("run.started", run_id=run_id, project=spec.project, base_model=spec.base_model, created=created)
    return to_view(row, settings)


@router.get("", response_model=RunList)
async def list_runs(
    settings: SettingsDep,
    db: DbDep,
    principal: PrincipalDep,
    project: str | None = Query(None, description="Only runs of this project."),
    state: RunState | None = Query(None, description="Only runs in this state."),
    limit: int = Query(100, ge=1, le=1000),
) -> RunList:
    """Runs of the projects the caller can see, newest first."""
    rows = await db.list_runs(
        project=project, state=state.value if state else None, limit=limit, projects=principal.visible_projects()
    )
    return RunList(runs=[to_view(r, settings) for r in rows])


@router.get("/{run_id}", response_model=RunView)
async def get_run(run_id: str, settings: SettingsDep, db: DbDep, principal: PrincipalDep) -> RunView:
    """State, progress, metrics (baseline and tuned eval loss) and artifacts of a run (viewer)."""
    return await full_view(db, await get_visible_run(db, principal, run_id), settings)


@router.post("/{run_id}/cancel", status_code=202, response_model=RunView)
async def cancel_run(
    run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep, principal: PrincipalDep
) -> RunView:
    """Ask the run to stop (operator). A training chunk finishes its step and checkpoints
    first; the run then ends `cancelled`."""
    row = await get_visible_run(db, principal, run_id, Role.operator)
    if RunState(row.state).terminal:
        raise HTTPException(409, f"run {run_id} already ended ({row.state}); nothing to cancel")
    try:
        await client.get_workflow_handle(run_id).cancel()
    except RPCError as exc:
        raise HTTPException(503, f"could not cancel on Temporal: {exc.message}") from None
    await db.add_event(run_id, "info", f"cancellation requested by {principal.subject}")
    return await full_view(db, await db.get_run(run_id), settings)


async def _update(
    client: Client, db: AsyncDatabase, settings: Settings, principal, run_id: str, update: str, what: str
) -> RunView:
    """Send a pause or resume update; the answer is the run as the workflow's update returned it
    (the row may not have heard of the change yet)."""
    row = await get_visible_run(db, principal, run_id, Role.operator)
    if RunState(row.state).terminal:
        raise HTTPException(409, f"run {run_id} already ended ({row.state}); nothing to {what}")
    try:
        status = await client.get_workflow_handle(run_id).execute_update(update, result_type=RunStatus)
    except WorkflowUpdateFailedError as exc:
        raise HTTPException(409, f"cannot {what} run {run_id}: {getattr(exc.cause, 'message', exc.cause)}") from None
    except RPCError as exc:
        raise HTTPException(503, f"could not {what} on Temporal: {exc.message}") from None
    await db.add_event(run_id, "info", f"{what} requested by {principal.subject}")
    view = await full_view(db, await db.get_run(run_id), settings)
    return view.model_copy(
        update={"state": status.state, "pause_requested": status.pause_requested, "step": max(view.step, status.step)}
    )


@router.post("/{run_id}/pause", status_code=202, response_model=RunView)
async def pause_run(
    run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep, principal: PrincipalDep
) -> RunView:
    """Pause a run (operator): the chunk in flight finishes its step, checkpoints and frees
    the GPU; the run waits in `paused` until resumed."""
    return await _update(client, db, settings, principal, run_id, "pause_run", "pause")


@router.post("/{run_id}/resume", status_code=202, response_model=RunView)
async def resume_run(
    run_id: str, settings: SettingsDep, db: DbDep, client: TemporalDep, principal: PrincipalDep
) -> RunView:
    """Resume a paused run from its newest checkpoint (operator)."""
    return await _update(client, db, settings, principal, run_id, "resume_run", "resume")


@router.get("/{run_id}/preflight", response_model=PreflightReport)
async def get_preflight(run_id: str, db: DbDep, principal: PrincipalDep) -> PreflightReport:
    """The run's preflight report: plan, hardware, memory, dataset checks and every default with why."""
    row = await get_visible_run(db, principal, run_id)
    reports = await db.events(run_id, kind="preflight")
    if not reports:
        raise HTTPException(404, f"run {run_id} has no preflight report yet (it is {row.state})")
    return PreflightReport.model_validate(reports[-1].data)


@router.get("/{run_id}/artifacts", response_model=list[ArtifactDetail])
async def run_artifacts(run_id: str, db: DbDep, principal: PrincipalDep) -> list[ArtifactDetail]:
    """The run's published artifacts with their lineage manifests (viewer)."""
    row = await get_visible_run(db, principal, run_id)
    return [ArtifactDetail(**a.model_dump(), project=row.project) for a in await db.artifacts(run_id)]


async def _newest_checkpoint(store: ArtifactStore, run_id: str) -> CheckpointRef | None:
    """The newest committed checkpoint (publish verifies its files against the manifest)."""
    for step in await run_in_threadpool(committed_steps, store, run_id):
        key = checkpoint_manifest_key(run_id, step)
        try:
            raw = await run_in_threadpool(store.get_bytes, key)
            json.loads(raw)
        except (OSError, ValueError):
            continue
        return CheckpointRef(manifest_key=key, step=step, manifest_sha256=hashlib.sha256(raw).hexdigest())
    return None


def _innermost(exc: BaseException) -> str:
    cause = exc
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return str(getattr(cause, "message", cause))


@router.post(
    "/{run_id}/publish-checkpoint",
    response_model=CheckpointPublishView,
    responses={202: {"model": CheckpointPublishView, "description": "Still publishing: call again for the artifact"}},
)
async def publish_checkpoint(
    run_id: str,
    response: Response,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    client: TemporalDep,
    principal: PrincipalDep,
    wait_s: float = Query(60, ge=0, le=300, description="Wait this long for the adapter before answering 202."),
) -> CheckpointPublishView:
    """Publish the newest committed checkpoint of a cancelled or failed run as a partial
    adapter (operator): the same files, manifest and model card as a finished run's, saying
    from which step of how many it comes, without a tuned eval. 200 with the artifact when
    done (also on a repeated call); 202 while still copying; 409 when the run is still going,
    succeeded (its adapter is published already) or has no checkpoint."""
    row = await get_visible_run(db, principal, run_id, Role.operator)
    state = RunState(row.state)
    if state == RunState.succeeded:
        raise HTTPException(
            409, f"run {run_id} succeeded: its adapter is already published ({row.adapter_path or row.adapter_uri}); "
            f"see GET /v1/runs/{run_id}/artifacts",
        )
    if not state.terminal:
        raise HTTPException(
            409, f"run {run_id} is still {state.value}: cancel it first (POST /v1/runs/{run_id}/cancel) "
            "or let it finish, which publishes its adapter",
        )
    wid = f"{run_id}-publish-checkpoint"  # one per run: a repeated call finds the same workflow
    published = next((a for a in await db.artifacts(run_id) if a.kind == "adapter"), None)
    if published is not None:
        m = published.manifest
        return CheckpointPublishView(
            run_id=run_id, status="published", step=m.get("parent", {}).get("step", row.step),
            total_steps=m.get("hyperparameters", {}).get("total_steps", row.total_steps or 0), workflow_id=wid,
            artifact=ArtifactDetail(**published.model_dump(), project=row.project),
        )
    ckpt = await _newest_checkpoint(store, run_id) if row.plan and row.dataset_snapshot else None
    if ckpt is None:
        raise HTTPException(
            409, f"run {run_id} has no committed checkpoint: it was {state.value} at step {row.step}, before its "
            f"first checkpoint (every {row.spec.get('checkpoint_every_steps')} steps); there is no adapter to publish",
        )
    plan = TrainingPlan.model_validate(row.plan)
    baseline = None
    if row.baseline_eval_loss is not None:
        # Only the loss is on the run row; the manifest reads loss and perplexity.
        loss = row.baseline_eval_loss
        baseline = EvalResult(label="baseline", loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=0)
    inp = PublishCheckpointInput(
        publish=PublishInput(
            run_id=run_id, plan=plan, snapshot=DatasetSnapshot.model_validate(row.dataset_snapshot),
            checkpoint=ckpt, baseline=baseline,
            partial=PartialAdapter(step=ckpt.step, total_steps=plan.total_steps, run_state=state.value, reason=row.error),
        ),
        cpu_task_queue=settings.cpu_task_queue,
    )
    try:
        handle = await client.start_workflow(
            "PublishCheckpoint", inp, id=wid, task_queue=settings.cpu_task_queue,
            # A publish that failed (say, on a corrupt file) may be tried again; a done one is found.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            result_type=PublishResult,
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(wid, result_type=PublishResult)
    except RPCError as exc:
        raise HTTPException(503, f"could not start the publish on Temporal ({exc.message}); is the stack running?") from None
    view = CheckpointPublishView(
        run_id=run_id, status="publishing", step=ckpt.step, total_steps=plan.total_steps, workflow_id=wid
    )
    try:
        await asyncio.wait_for(handle.result(), timeout=wait_s)
    except asyncio.TimeoutError:
        response.status_code = 202
        return view
    except WorkflowFailureError as exc:
        raise HTTPException(
            409, f"could not publish checkpoint step {ckpt.step} of run {run_id}: {_innermost(exc)}"
        ) from None
    artifact = next(a for a in await db.artifacts(run_id) if a.kind == "adapter")
    log.info("run.checkpoint_published", run_id=run_id, step=ckpt.step, uri=artifact.uri)
    return view.model_copy(
        update={"status": "published", "artifact": ArtifactDetail(**artifact.model_dump(), project=row.project)}
    )


EVENT_LOOKBACK = 50
POLL_S = 0.5


async def visible_run(run_id: str, db: DbDep, principal: PrincipalDep) -> RunRow:
    """The run a viewer may read, checked as a dependency so a stream's 404 is answered
    before its 200 headers go out."""
    return await get_visible_run(db, principal, run_id)


@router.get(
    "/{run_id}/events",
    response_class=EventSourceResponse,
    responses={
        **errors_as_json(),
        200: {"description": "Server-sent events, one per run event, then `end` with the run's state."},
    },
)
async def run_events(
    run_id: str,
    db: DbDep,
    _run: Annotated[RunRow, Depends(visible_run)],
    follow: bool = Query(True, description="Keep the stream open until the run ends."),
    last_event_id: int = Header(0, alias="Last-Event-ID", ge=0, description="Resume after this event id."),
) -> AsyncIterator[ServerSentEvent]:
    """The run's events as server-sent events: state transitions, training progress (step,
    loss), warnings. With follow, the stream ends after the run's final state. While
    nothing happens, EventSourceResponse sends a keep-alive comment every 15 s."""
    # Ids come from a sequence: on PostgreSQL an event can commit after one with a higher
    # id. Each poll looks back EVENT_LOOKBACK ids and sends what it has not sent yet.
    after = last_event_id
    sent: set[int] = set()
    while True:
        window = await db.events(run_id, max(last_event_id, after - EVENT_LOOKBACK))
        events = [ev for ev in window if ev.id not in sent]
        for ev in events:
            sent.add(ev.id)
            after = max(after, ev.id)
            view = EventView(**ev.model_dump())
            yield ServerSentEvent(id=str(view.id), event=view.kind, data=view)
        sent = {i for i in sent if i > after - EVENT_LOOKBACK}
        row = await db.get_run(run_id)
        if not follow or (RunState(row.state).terminal and not events):
            yield ServerSentEvent(event="end", data={"state": row.state})
            return
        await asyncio.sleep(POLL_S)
