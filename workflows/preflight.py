"""PreflightLLM: the dry run behind `POST /v1/preflight` and `lockn-tune preflight`.

The training worker reports its hardware; worker_cpu builds the report against it. Nothing
is trained and nothing is recorded on a run.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from schemas.preflight import PreflightInput, PreflightReport


@workflow.defn(name="PreflightLLM")
class PreflightLLM:
    @workflow.run
    async def run(self, inp: PreflightInput, cpu_task_queue: str, gpu_task_queue: str) -> PreflightReport:
        hardware = await workflow.execute_activity(
            "inspect_hardware",
            task_queue=gpu_task_queue,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=dict,
        )
        return await workflow.execute_activity(
            "preflight_report",
            inp.model_copy(update={"hardware": hardware}),
            task_queue=cpu_task_queue,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_attempts=2, non_retryable_error_types=["UserError"]),
            result_type=PreflightReport,
        )


@workflow.defn(name="InspectHardware")
class InspectHardware:
    """What a training worker has (GPU, memory, bf16, bitsandbytes, disk), for GET /v1/models."""

    @workflow.run
    async def run(self, gpu_task_queue: str) -> dict:
        return await workflow.execute_activity(
            "inspect_hardware",
            task_queue=gpu_task_queue,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=dict,
        )
