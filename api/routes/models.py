"""Models: the supported base models (schemas/model_matrix.yaml) and whether each fits the workers."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from fastapi import APIRouter, HTTPException, Request
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from activities.memory_estimate import ModelShape, estimate_training_memory, usable_memory
from api.deps import get_temporal
from schemas.api_models import FitSettings, FitVerdict, ModelList, ModelView
from schemas.hardware import HardwareInfo
from schemas.errors import NO_GPU_WORKER
from schemas.model_matrix import ModelEntry, load_matrix
from schemas.run_spec import Method
from schemas.settings import Settings, no_gpu_worker_message
from store.tables import new_id

router = APIRouter(prefix="/v1/models", tags=["models"])


class EstimateFn(Protocol):
    def __call__(self, entry: ModelEntry, *, method: str, settings: FitSettings, dtype: str, device: str) -> int: ...


def estimate_entry_memory(entry: ModelEntry, *, method: str, settings: FitSettings, dtype: str, device: str) -> int:
    """Peak training memory in bytes for a matrix entry, from the same estimator preflight uses."""
    return estimate_training_memory(
        ModelShape.from_matrix_entry(entry),
        method=method,
        lora_r=settings.lora_r,
        target_modules=entry.lora_target_modules,
        seq_len=settings.seq_len,
        micro_batch=settings.micro_batch,
        gradient_checkpointing=settings.gradient_checkpointing,
        dtype=dtype,
        device=device,
    ).total


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def fit_verdict(
    entry: ModelEntry,
    method: Method,
    hardware: HardwareInfo,
    estimate_fn: EstimateFn = estimate_entry_memory,
    settings: FitSettings | None = None,
) -> FitVerdict:
    """Whether tuning `entry` with `method` at `settings` fits `hardware`, and why."""
    settings = settings or FitSettings()
    usable = usable_memory(hardware)
    what, available = usable.what, usable.bytes
    if method not in entry.methods:
        offered = ", ".join(m.value for m in entry.methods)
        reason = f"{method.value} is not offered for this model (use: {offered})"
        return FitVerdict(fits=False, available_bytes=available, reason=reason)
    device = hardware.device
    dtype = hardware.precision
    estimate = estimate_fn(entry, method=method.value, settings=settings, dtype=dtype, device=device)
    if method == Method.qlora and not hardware.bitsandbytes_usable:
        return FitVerdict(
            fits=False,
            estimate_bytes=estimate,
            available_bytes=available,
            reason="bitsandbytes does not load on the worker, and qlora needs it; use lora",
        )
    if available is None:
        return FitVerdict(
            fits=None, estimate_bytes=estimate, reason=f"needs about {_gb(estimate)}; the worker's memory is unknown"
        )
    caveat = "; approximate: estimated from the talker's shape" if entry.kind == "tts" else ""
    fits = estimate <= available
    verdict = "fits" if fits else "does not fit"
    return FitVerdict(
        fits=fits,
        estimate_bytes=estimate,
        available_bytes=available,
        reason=f"{verdict}: needs about {_gb(estimate)} of {_gb(available)} usable {what} on {device} "
        f"({dtype}, seq {settings.seq_len}, micro-batch {settings.micro_batch}, rank {settings.lora_r}){caveat}",
    )




async def require_gpu_worker(client: Client, settings: Settings) -> None:
    """503 at once, naming the queue and how to start worker_gpu, when no worker has polled the
    hardware queue lately (the Temporal server lists a queue's recent pollers)."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=settings.hardware_task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    try:
        described = await client.workflow_service.describe_task_queue(request)
    except RPCError as exc:
        raise HTTPException(503, f"could not ask Temporal at {settings.temporal_address} about workers: {exc.message}") from None
    if not described.pollers:
        raise HTTPException(503, no_gpu_worker_message(settings.gpu_task_queue))


def failure_message(exc: WorkflowFailureError) -> tuple[str | None, str]:
    """(error type, message) of the innermost cause of a failed workflow."""
    cause = exc.cause
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return getattr(cause, "type", None), str(getattr(cause, "message", cause))


async def get_hardware(request: Request) -> HardwareInfo:
    """The training workers' hardware, as a GPU worker reports it on its hardware queue (the
    API never imports torch; training never delays it). Asked once per API process and kept on app.state."""
    state = request.app.state
    hardware = getattr(state, "hardware", None)
    if hardware is None:
        settings = state.settings
        client = await get_temporal(request)
        await require_gpu_worker(client, settings)
        try:
            report = await client.execute_workflow(
                "InspectHardware",
                settings.gpu_task_queue,
                id=new_id("hardware"),
                task_queue=settings.cpu_task_queue,
                execution_timeout=timedelta(seconds=60),
                result_type=HardwareInfo,
            )
        except WorkflowFailureError as exc:
            kind, message = failure_message(exc)
            if kind == NO_GPU_WORKER:
                raise HTTPException(503, message) from None
            raise HTTPException(503, f"no training worker reported its hardware ({message}); is worker_gpu running?") from None
        except RPCError as exc:
            raise HTTPException(503, f"could not ask Temporal for the hardware ({exc.message}); is the stack running?") from None
        hardware = state.hardware = report
    return hardware


def model_view(entry: ModelEntry, hardware: HardwareInfo, settings: FitSettings) -> ModelView:
    fits = {method: fit_verdict(entry, method, hardware, settings=settings) for method in Method}
    return ModelView(**entry.model_dump(), fits=fits)


@router.get("", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every supported base model (the model matrix), with whether LoRA and QLoRA runs fit the workers' hardware."""
    hardware = await get_hardware(request)
    settings = FitSettings()
    return ModelList(
        hardware=hardware,
        fit_settings=settings,
        models=[model_view(entry, hardware, settings) for entry in load_matrix().models],
    )


@router.get("/{model_id:path}", response_model=ModelView)
async def get_model(model_id: str, request: Request) -> ModelView:
    """One supported base model by its Hugging Face id (e.g. Qwen/Qwen3-8B), with what fits."""
    entry = load_matrix().get(model_id)
    if entry is None:
        raise HTTPException(
            404, f"model {model_id!r} is not in the model matrix; GET /v1/models lists the supported models"
        )
    return model_view(entry, await get_hardware(request), FitSettings())
