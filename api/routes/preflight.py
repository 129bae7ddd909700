"""Dry runs: the preflight report for a spec, without starting a run."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, HTTPException
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from api.deps import DbDep, PrincipalDep, Role, SettingsDep, TemporalDep
from api.routes.models import failure_message, require_gpu_worker
from api.routes.runs import check_dataset
from schemas.errors import NO_GPU_WORKER
from schemas.preflight import DryRunInput, PreflightReport
from schemas.run_spec import RunSpec
from store.tables import new_id

router = APIRouter(prefix="/v1/preflight", tags=["preflight"])


@router.post("", response_model=PreflightReport)
async def preflight(
    spec: RunSpec, settings: SettingsDep, db: DbDep, client: TemporalDep, principal: PrincipalDep
) -> PreflightReport:
    """Check a spec against the training worker's hardware and the data: the plan, memory
    estimate, rendered samples, token lengths, every default with why — or what to change
    (`ok: false` with `errors`). Nothing is trained, and it never waits behind a training run;
    503 at once when no GPU worker is up. Needs operator on the spec's project."""
    principal.require(spec.project, Role.operator, f"project {spec.project!r}")
    await check_dataset(db, settings, principal, spec)
    await require_gpu_worker(client, settings)
    run_id = new_id("preflight")
    try:
        return await client.execute_workflow(
            "PreflightLLM",
            DryRunInput(
                run_id=run_id, spec=spec, cpu_task_queue=settings.cpu_task_queue, gpu_task_queue=settings.gpu_task_queue
            ),
            id=run_id,
            task_queue=settings.cpu_task_queue,
            execution_timeout=timedelta(minutes=5),
            result_type=PreflightReport,
        )
    except WorkflowFailureError as exc:
        kind, message = failure_message(exc)
        if kind == NO_GPU_WORKER:
            raise HTTPException(503, message) from None
        raise HTTPException(422, f"preflight failed: {message}") from None
    except RPCError as exc:
        raise HTTPException(503, f"could not run preflight on Temporal: {exc.message}") from None
