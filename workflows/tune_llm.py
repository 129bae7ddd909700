"""TuneLLM: one LoRA/QLoRA tuning run, from preflight to a published adapter.

The workflow only orchestrates. Activities are called by name so this module never
imports torch, transformers or sqlalchemy, even indirectly.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from schemas import search_attributes as sa
    from schemas.activities import (
        ChunkInput,
        ChunkResult,
        DatasetSnapshot,
        EvalResult,
        EvaluateInput,
        PreflightInput,
        PublishInput,
        PublishResult,
        RecordEventInput,
        RunInput,
        RunResult,
        SnapshotInput,
        TrainingPlan,
    )
    from schemas.run_state import RunState, RunStatus

USER_ERROR = "UserError"

# User errors fail at once; anything else (a lost worker, a locked DB) is retried.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[USER_ERROR],
)


@workflow.defn(name="TuneLLM")
class TuneLLM:
    def __init__(self) -> None:
        self._status: RunStatus | None = None
        self._seq = 0

    @workflow.query
    def status(self) -> RunStatus:
        """State and progress; works on closed workflows too."""
        return self._status or RunStatus(run_id=workflow.info().workflow_id)

    @workflow.run
    async def run(self, inp: RunInput) -> RunResult:
        self._status = RunStatus(run_id=inp.run_id)
        self._inp = inp
        try:
            return await self._run(inp)
        except asyncio.CancelledError:
            # The activity in flight has already checkpointed (train_chunk waits for that).
            await self._enter(RunState.cancelled, "cancelled on request")
            raise
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                await self._enter(RunState.cancelled, "cancelled on request")
                raise
            reason = _reason(err)
            self._status.error = reason
            await self._enter(RunState.failed, reason, error=reason)
            raise ApplicationError(reason, type="RunFailed", non_retryable=True) from err

    async def _run(self, inp: RunInput) -> RunResult:
        spec = inp.spec
        await self._enter(RunState.preflight, "checking the model, the data and the config")
        plan = await self._cpu("preflight", PreflightInput(run_id=inp.run_id, spec=spec), TrainingPlan, minutes=30)
        self._status.total_steps = plan.total_steps
        await self._enter(
            RunState.preparing_data,
            f"plan: {plan.total_steps} steps, micro-batch {plan.micro_batch_size} x {plan.grad_accum}",
            plan=plan.model_dump(mode="json"),
            total_steps=plan.total_steps,
        )

        snapshot = await self._cpu("snapshot_dataset", SnapshotInput(run_id=inp.run_id, plan=plan), DatasetSnapshot, minutes=120)
        await self._enter(
            RunState.baseline_eval,
            f"snapshot {snapshot.sha256[:12]}: {snapshot.train_rows} train / {snapshot.eval_rows} eval rows",
            dataset_snapshot=snapshot.model_dump(mode="json"),
        )

        baseline = await self._gpu(
            "evaluate", EvaluateInput(run_id=inp.run_id, plan=plan, snapshot=snapshot, label="baseline"), EvalResult
        )
        self._status.baseline_eval_loss = baseline.loss
        await self._enter(
            RunState.training, f"baseline eval loss {baseline.loss:.4f}", baseline_eval_loss=baseline.loss
        )

        step, losses, chunk = 0, [], None
        while step < plan.total_steps:
            until = min(step + spec.checkpoint_every_steps, plan.total_steps)
            chunk = await self._gpu(
                "train_chunk",
                ChunkInput(run_id=inp.run_id, plan=plan, snapshot=snapshot, until_step=until),
                ChunkResult,
                wait_for_cancel=True,
            )
            if workflow.cancellation_reason() is not None:
                # The chunk finished before it heard of the cancel: its checkpoint is committed.
                raise asyncio.CancelledError()
            if chunk.step <= step:
                raise ApplicationError(f"train_chunk made no progress past step {step}", non_retryable=True)
            step = chunk.step
            losses.extend(chunk.step_losses)
            self._status.step, self._status.loss = step, chunk.loss

        await self._enter(RunState.evaluating, f"trained {step} steps, final chunk loss {chunk.loss:.4f}")
        tuned = await self._gpu(
            "evaluate",
            EvaluateInput(run_id=inp.run_id, plan=plan, snapshot=snapshot, checkpoint=chunk.checkpoint, label="tuned"),
            EvalResult,
        )
        self._status.tuned_eval_loss = tuned.loss
        await self._enter(RunState.publishing, f"tuned eval loss {tuned.loss:.4f}", tuned_eval_loss=tuned.loss)

        published = await self._cpu(
            "publish",
            PublishInput(
                run_id=inp.run_id,
                plan=plan,
                snapshot=snapshot,
                checkpoint=chunk.checkpoint,
                baseline=baseline,
                tuned=tuned,
                step_losses=losses,
            ),
            PublishResult,
            minutes=60,
        )
        self._status.adapter_uri = published.adapter_uri
        await self._enter(
            RunState.succeeded,
            f"adapter published at {published.adapter_path or published.adapter_uri}",
            adapter_uri=published.adapter_uri,
            adapter_path=published.adapter_path,
            manifest_uri=published.manifest_uri,
            metrics={"baseline": baseline.model_dump(mode="json"), "tuned": tuned.model_dump(mode="json")},
        )
        return RunResult(
            run_id=inp.run_id,
            state=RunState.succeeded,
            baseline_eval_loss=baseline.loss,
            tuned_eval_loss=tuned.loss,
            adapter_uri=published.adapter_uri,
            manifest_uri=published.manifest_uri,
        )

    async def _enter(self, state: RunState, message: str = "", **fields) -> None:
        """Record a transition: a run event row, the query status, and the search attribute."""
        self._status.state = state
        self._seq += 1
        workflow.upsert_search_attributes([sa.STATE.value_set(state.value)])
        await workflow.execute_activity(
            "record_event",
            RecordEventInput(run_id=self._inp.run_id, seq=self._seq, state=state, message=message, data=fields),
            task_queue=self._inp.cpu_task_queue,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RETRY,
        )

    async def _cpu(self, name: str, arg, result_type, minutes: int):
        return await workflow.execute_activity(
            name,
            arg,
            task_queue=self._inp.cpu_task_queue,
            start_to_close_timeout=timedelta(minutes=minutes),
            retry_policy=RetryPolicy(
                initial_interval=RETRY.initial_interval,
                maximum_interval=RETRY.maximum_interval,
                maximum_attempts=5,
                non_retryable_error_types=RETRY.non_retryable_error_types,
            ),
            result_type=result_type,
        )

    async def _gpu(self, name: str, arg, result_type, wait_for_cancel: bool = False):
        # Heartbeats come every few seconds (from a helper thread while a model loads), so a
        # dead worker is noticed within the heartbeat timeout and the work is retried elsewhere.
        return await workflow.execute_activity(
            name,
            arg,
            task_queue=self._inp.gpu_task_queue,
            start_to_close_timeout=timedelta(hours=24),
            heartbeat_timeout=timedelta(seconds=60),
            # Enough attempts to outlive worker restarts; a bug that fails every time still ends the run.
            retry_policy=RetryPolicy(
                initial_interval=RETRY.initial_interval,
                maximum_interval=timedelta(seconds=60),
                maximum_attempts=10,
                non_retryable_error_types=RETRY.non_retryable_error_types,
            ),
            cancellation_type=(
                workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
                if wait_for_cancel
                else workflow.ActivityCancellationType.TRY_CANCEL
            ),
            result_type=result_type,
        )


def _reason(err: ActivityError) -> str:
    """The message a person can act on, from the innermost cause."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    if isinstance(cause, TimeoutError):
        return f"{err.activity_type} timed out ({cause.type.name.lower()}); the worker may have died, check worker_gpu logs"
    return str(cause or err)
