"""PreflightLLM: the dry run behind `POST /v1/preflight` and `lockn-tune preflight`.

A training worker reports its hardware on its light hardware queue (never behind
training), or the dry run fails at once saying no GPU worker is up; worker_cpu builds the report against it. Nothing
is trained and nothing is recorded on a run.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from schemas.hardware import HardwareInfo
    from schemas.preflight import DryRunInput, PreflightInput, PreflightReport
    from schemas.errors import NO_GPU_WORKER, USER_ERROR
    from schemas.settings import hardware_task_queue_for, no_gpu_worker_message

# Workflows started before the hardware queue asked the GPU queue, behind training.
HARDWARE_QUEUE_PATCH = "inspect-hardware-on-hardware-queue"
# A GPU worker's hardware queue answers in about a second; this long without a pickup means none is up.
HARDWARE_WAIT = timedelta(seconds=10)


async def inspect_hardware(gpu_task_queue: str) -> HardwareInfo:
    """Ask a GPU worker for its hardware on its light hardware queue, failing fast with
    NO_GPU_WORKER when none picks the task up. (Old histories: the GPU queue, as recorded.)"""
    if not workflow.patched(HARDWARE_QUEUE_PATCH):
        return await workflow.execute_activity(
            "inspect_hardware",
            task_queue=gpu_task_queue,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=HardwareInfo,
        )
    try:
        return await workflow.execute_activity(
            "inspect_hardware",
            task_queue=hardware_task_queue_for(gpu_task_queue),
            schedule_to_start_timeout=HARDWARE_WAIT,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=HardwareInfo,
        )
    except ActivityError as err:
        if isinstance(err.cause, TimeoutError) and err.cause.type == TimeoutType.SCHEDULE_TO_START:
            raise ApplicationError(
                no_gpu_worker_message(gpu_task_queue, HARDWARE_WAIT.total_seconds()), type=NO_GPU_WORKER, non_retryable=True
            ) from None
        raise


@workflow.defn(name="PreflightLLM")
class PreflightLLM:
    @workflow.run
    async def run(self, inp: DryRunInput) -> PreflightReport:
        hardware = await inspect_hardware(inp.gpu_task_queue)
        return await workflow.execute_activity(
            "preflight_report",
            PreflightInput(run_id=inp.run_id, spec=inp.spec, hardware=hardware),
            task_queue=inp.cpu_task_queue,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_attempts=2, non_retryable_error_types=[USER_ERROR]),
            result_type=PreflightReport,
        )


@workflow.defn(name="InspectHardware")
class InspectHardware:
    """What a training worker has (GPU, memory, bf16, bitsandbytes, disk), for GET /v1/models."""

    @workflow.run
    async def run(self, gpu_task_queue: str) -> HardwareInfo:
        return await inspect_hardware(gpu_task_queue)
