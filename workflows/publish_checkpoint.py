"""PublishCheckpoint: the adapter of a cancelled or failed run's newest committed checkpoint.

Started by `POST /v1/runs/{id}/publish-checkpoint` with the workflow id
`<run id>-publish-checkpoint`; it runs the same `publish` activity as TuneLLM, with no tuned
eval and the partial-adapter note, so the manifest and the model card say what it is.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from schemas.activities import PublishCheckpointInput, PublishResult
    from schemas.errors import USER_ERROR


@workflow.defn(name="PublishCheckpoint")
class PublishCheckpoint:
    @workflow.run
    async def run(self, inp: PublishCheckpointInput) -> PublishResult:
        return await workflow.execute_activity(
            "publish",
            inp.publish,
            task_queue=inp.cpu_task_queue,
            start_to_close_timeout=timedelta(minutes=60),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=5,
                non_retryable_error_types=[USER_ERROR],
            ),
            result_type=PublishResult,
        )
