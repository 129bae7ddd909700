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
        FetchedModel,
        FetchModelInput,
        PublishInput,
        PublishResult,
        RecordEventInput,
        RunCarry,
        RunInput,
        RunResult,
        SnapshotInput,
        TrainingPlan,
    )
    from schemas.hardware import HardwareInfo
    from schemas.preflight import PreflightInput
    from schemas.run_state import RunState, RunStatus
    from schemas.errors import OUT_OF_MEMORY, RUN_FAILED, USER_ERROR
    from schemas.settings import hardware_task_queue_for

# Runs started before the hardware queue asked for the hardware on the GPU queue, behind training.
HARDWARE_QUEUE_PATCH = "inspect-hardware-on-hardware-queue"
# Runs started before this measured the tuned eval loss again after the last chunk had measured it.
TUNED_EVAL_PATCH = "tuned-eval-reuses-checkpoint-eval"
# Runs started before this found a Hub id in the worker's Hugging Face cache or failed; now a
# fetch_base_model step puts it into the artifact store first.
FETCH_MODEL_PATCH = "fetch-base-model"

# User errors fail at once; anything else (a lost worker, a locked DB) is retried.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[USER_ERROR],
)
# A download cut short fails its attempt retryably and the next one resumes it, so a fetch gets
# more attempts; gated, missing and too-big models are user errors and fail at once.
FETCH_RETRY = RetryPolicy(
    initial_interval=RETRY.initial_interval,
    backoff_coefficient=RETRY.backoff_coefficient,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=10,
    non_retryable_error_types=RETRY.non_retryable_error_types,
)


@workflow.defn(name="TuneLLM")
class TuneLLM:
    def __init__(self) -> None:
        self._status: RunStatus | None = None
        self._seq = 0
        self._pause_requested = False
        self._chunk: workflow.ActivityHandle | None = None

    @workflow.query
    def status(self) -> RunStatus:
        """State and progress; works on closed workflows too."""
        return self._status or RunStatus(run_id=workflow.info().workflow_id)

    # Pause and resume: updates for the API (validated and acknowledged), signals for
    # operators (`temporal workflow signal --name pause`).

    @workflow.update(name="pause_run")
    def pause_run(self) -> RunStatus:
        self._request_pause()
        return self.status()

    @pause_run.validator
    def _validate_pause(self) -> None:
        state = self.status().state
        if state.terminal or state in (RunState.evaluating, RunState.publishing):
            raise ValueError(f"the run is {state.value}: training is over, there is nothing to pause")
        if self._pause_requested:
            raise ValueError("the run is already paused (or pausing); resume it instead")

    @workflow.update(name="resume_run")
    def resume_run(self) -> RunStatus:
        self._pause_requested = False
        self._status.pause_requested = False
        return self.status()

    @resume_run.validator
    def _validate_resume(self) -> None:
        if not self._pause_requested:
            raise ValueError(f"the run is {self.status().state.value}, not paused: there is nothing to resume")

    @workflow.signal(name="pause")
    def pause_signal(self) -> None:
        if not self.status().state.terminal:
            self._request_pause()

    @workflow.signal(name="resume")
    def resume_signal(self) -> None:
        self._pause_requested = False
        if self._status:
            self._status.pause_requested = False

    def _request_pause(self) -> None:
        self._pause_requested = True
        if self._status:
            self._status.pause_requested = True
        # The chunk in flight hears this at its next heartbeat, finishes its step,
        # checkpoints and returns that step: a paused run holds no GPU.
        if self._chunk is not None and not self._chunk.done():
            self._chunk.cancel()

    @workflow.run
    async def run(self, inp: RunInput) -> RunResult:
        self._inp = inp
        self._status = RunStatus(run_id=inp.run_id, pause_requested=self._pause_requested)
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
            await self._fail(_reason(err), err)
        except ApplicationError as err:
            await self._fail(err.message, err)

    async def _fail(self, reason: str, err: Exception):
        await self._enter(RunState.failed, reason, error=reason)
        raise ApplicationError(reason, type=RUN_FAILED, non_retryable=True) from err

    async def _run(self, inp: RunInput) -> RunResult:
        if inp.carry is None:
            carry = await self._prepare(inp)
        else:
            carry = inp.carry
            self._seq, self._pause_requested = carry.seq, carry.pause_requested or self._pause_requested
            self._status = RunStatus(
                run_id=inp.run_id, state=RunState.training, step=carry.step, total_steps=carry.plan.total_steps,
                loss=carry.loss, baseline_eval_loss=carry.baseline.loss, pause_requested=self._pause_requested,
            )
        last = await self._train(inp, carry)
        return await self._finish(inp, carry, last)

    async def _prepare(self, inp: RunInput) -> RunCarry:
        """Preflight (with the base model fetched from the Hub first, when it is a Hub id),
        dataset snapshot and baseline eval."""
        spec = inp.spec
        await self._enter(RunState.preflight, "checking the model, the data and the config")
        if workflow.patched(HARDWARE_QUEUE_PATCH):
            # The light hardware queue: never behind another run's training. No pickup deadline:
            # a run waits for a GPU worker as its training would.
            hardware = await workflow.execute_activity(
                "inspect_hardware",
                task_queue=hardware_task_queue_for(inp.gpu_task_queue),
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(
                    initial_interval=RETRY.initial_interval,
                    maximum_interval=RETRY.maximum_interval,
                    maximum_attempts=10,
                    non_retryable_error_types=RETRY.non_retryable_error_types,
                ),
                result_type=HardwareInfo,
            )
        else:
            hardware = await self._gpu("inspect_hardware", None, HardwareInfo)
        base_model = None
        if workflow.patched(FETCH_MODEL_PATCH):
            # The activity decides whether there is anything to fetch (a local folder or a cached
            # model is not) and reports the download in the run's events, keyed by commit.
            base_model = await workflow.execute_activity(
                "fetch_base_model",
                FetchModelInput(run_id=inp.run_id, repo_id=spec.base_model, spec=spec, hardware=hardware),
                task_queue=inp.cpu_task_queue,
                start_to_close_timeout=timedelta(hours=24),
                heartbeat_timeout=timedelta(seconds=inp.heartbeat_timeout_s),
                retry_policy=FETCH_RETRY,
                result_type=FetchedModel | None,
            )
        plan = await self._cpu(
            "preflight",
            PreflightInput(run_id=inp.run_id, spec=spec, hardware=hardware, base_model=base_model),
            TrainingPlan,
            minutes=30,
        )
        await self._enter(
            RunState.preparing_data,
            f"plan: {plan.total_steps} steps, micro-batch {plan.micro_batch_size} x {plan.grad_accum}",
            attach={"plan": plan.model_dump(mode="json")},
            total_steps=plan.total_steps,
        )
        snapshot = await self._cpu("snapshot_dataset", SnapshotInput(run_id=inp.run_id, plan=plan), DatasetSnapshot, minutes=120)
        await self._enter(
            RunState.baseline_eval,
            f"snapshot {snapshot.sha256[:12]}: {snapshot.train_rows} train / {snapshot.eval_rows} eval rows",
            attach={"dataset_snapshot": snapshot.model_dump(mode="json")},
        )
        baseline = await self._gpu(
            "evaluate", EvaluateInput(run_id=inp.run_id, plan=plan, snapshot=snapshot, label="baseline"), EvalResult
        )
        await self._enter(RunState.training, f"baseline eval loss {baseline.loss:.4f}", baseline_eval_loss=baseline.loss)
        return RunCarry(plan=plan, snapshot=snapshot, baseline=baseline, step=0, seq=self._seq)

    async def _train(self, inp: RunInput, carry: RunCarry) -> ChunkResult | None:
        """The chunk loop: one committed checkpoint per chunk; pause, cancel and
        continue-as-new only between chunks. Returns the last chunk (None when this run of
        the workflow trained none)."""
        plan = carry.plan
        chunk = None
        while carry.step < plan.total_steps:
            if self._pause_requested:
                await self._enter(RunState.paused, f"paused at step {carry.step}; the GPU is free")
                await workflow.wait_condition(lambda: not self._pause_requested)
                await self._enter(RunState.training, f"resumed at step {carry.step}")
            if workflow.info().is_continue_as_new_suggested():
                carry.seq, carry.pause_requested = self._seq, self._pause_requested
                workflow.continue_as_new(inp.model_copy(update={"carry": carry}))
            until = min(carry.step + inp.spec.checkpoint_every_steps, plan.total_steps)
            self._chunk = self._start_gpu(
                "train_chunk",
                ChunkInput(run_id=inp.run_id, plan=plan, snapshot=carry.snapshot, from_step=carry.step, until_step=until),
                ChunkResult,
                wait_for_cancel=True,
            )
            try:
                chunk = await self._chunk
            except ActivityError as err:
                paused = isinstance(err.cause, CancelledError) and workflow.cancellation_reason() is None
                if paused and self._pause_requested:
                    # A chunk of an older worker: it checkpointed, then reported itself cancelled.
                    # Today's chunks return the step they stopped at, so the pause names it.
                    continue
                if isinstance(err.cause, ApplicationError) and err.cause.type == OUT_OF_MEMORY:
                    carry.plan = plan = await self._smaller_micro_batch(plan, err.cause.message)
                    continue  # same examples per step, so the data order and schedule are unchanged
                raise
            finally:
                self._chunk = None
            if workflow.cancellation_reason() is not None:
                # The chunk finished before it heard of the cancel: its checkpoint is committed.
                raise asyncio.CancelledError()
            if chunk.step < carry.step:
                raise ApplicationError(f"train_chunk went back from step {carry.step} to {chunk.step}", non_retryable=True)
            carry.step, carry.loss, carry.checkpoint = chunk.step, chunk.loss, chunk.checkpoint
            self._status.step, self._status.loss = chunk.step, chunk.loss
        return chunk

    async def _smaller_micro_batch(self, plan: TrainingPlan, reason: str) -> TrainingPlan:
        """Half the micro-batch (or the next divisor), more accumulation: the same effective batch.
        The new plan comes from the plan itself (TrainingPlan.with_micro_batch), memory estimate
        included, and is recorded on the run, so lineage reads the plan that trained."""
        smaller = plan.smaller_micro_batch()
        if smaller is None:
            raise ApplicationError(
                f"{reason}. It does not fit even with micro-batch 1: lower hyperparameters.max_seq_len "
                f"(now {plan.max_seq_len}), use method 'qlora', or pick a smaller base model",
                type=USER_ERROR,
                non_retryable=True,
            )
        new = plan.with_micro_batch(smaller)
        await self._record(
            RunState.training,
            f"{reason}; retrying with micro-batch {new.micro_batch_size} x grad_accum {new.grad_accum} "
            f"(same {plan.micro_batch_size * plan.grad_accum} examples per step)",
            attach={"plan": new.model_dump(mode="json")},
        )
        return new

    async def _finish(self, inp: RunInput, carry: RunCarry, last: ChunkResult | None) -> RunResult:
        """Tuned eval and publish. The tuned eval loss is the one the last chunk measured over the
        whole eval split at the plan's last step, when it did; evaluate then only adds the samples."""
        plan, snapshot, baseline = carry.plan, carry.snapshot, carry.baseline
        await self._enter(RunState.evaluating, f"trained {carry.step} steps, last chunk loss {carry.loss:.4f}")
        measured = {}
        if (
            workflow.patched(TUNED_EVAL_PATCH)
            and last is not None
            and last.checkpoint == carry.checkpoint
            and last.final_eval_loss is not None
            and last.final_eval_tokens is not None
        ):
            measured = {"eval_loss": last.final_eval_loss, "eval_tokens": last.final_eval_tokens}
        tuned = await self._gpu(
            "evaluate",
            EvaluateInput(
                run_id=inp.run_id, plan=plan, snapshot=snapshot, checkpoint=carry.checkpoint, label="tuned", **measured
            ),
            EvalResult,
        )
        await self._enter(RunState.publishing, f"tuned eval loss {tuned.loss:.4f}", tuned_eval_loss=tuned.loss)
        published = await self._cpu(
            "publish",
            PublishInput(
                run_id=inp.run_id, plan=plan, snapshot=snapshot, checkpoint=carry.checkpoint, baseline=baseline, tuned=tuned
            ),
            PublishResult,
            minutes=60,
        )
        await self._enter(
            RunState.succeeded,
            f"adapter published at {published.adapter_path or published.adapter_uri}",
            attach={"metrics": {"baseline": baseline.model_dump(mode="json"), "tuned": tuned.model_dump(mode="json")}},
            adapter_uri=published.adapter_uri,
            adapter_path=published.adapter_path,
            manifest_uri=published.manifest_uri,
        )
        return RunResult(
            run_id=inp.run_id,
            state=RunState.succeeded,
            baseline_eval_loss=baseline.loss,
            tuned_eval_loss=tuned.loss,
            adapter_uri=published.adapter_uri,
            manifest_uri=published.manifest_uri,
        )

    async def _enter(self, state: RunState, message: str = "", *, attach: dict | None = None, **changes) -> None:
        """A transition: `changes` (RunStatus fields) and the state go into the status, and
        everything else derives from that one status: the query answers it, the search
        attribute is set from it, and record_event writes the run's row from it. `attach`:
        large facts kept on the row only (plan, snapshot, metrics)."""
        self._status = self._status.model_copy(update={"state": state, **changes})
        workflow.upsert_search_attributes(sa.from_status(self._status))
        await self._record(state, message, attach=attach, **changes)

    async def _record(self, state: RunState, message: str, *, attach: dict | None = None, **data) -> None:
        """Write one event (and the row, from the status) through record_event, keyed by seq."""
        self._seq += 1
        await workflow.execute_activity(
            "record_event",
            RecordEventInput(
                run_id=self._inp.run_id, seq=self._seq, state=state, message=message, data=data,
                status=self._status, attach=attach or {},
            ),
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

    def _start_gpu(self, name: str, arg, result_type, wait_for_cancel: bool = False) -> workflow.ActivityHandle:
        # Heartbeats come every few seconds (from a helper thread while a model loads), so a
        # dead worker is noticed within the heartbeat timeout and the work is retried elsewhere.
        return workflow.start_activity(
            name,
            args=[] if arg is None else [arg],
            task_queue=self._inp.gpu_task_queue,
            start_to_close_timeout=timedelta(hours=24),
            heartbeat_timeout=timedelta(seconds=self._inp.heartbeat_timeout_s),
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

    async def _gpu(self, name: str, arg, result_type):
        return await self._start_gpu(name, arg, result_type)


def _reason(err: ActivityError) -> str:
    """The message a person can act on, from the innermost cause."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    if isinstance(cause, TimeoutError):
        return f"{err.activity_type} timed out ({cause.type.name.lower()}); the worker may have died, check worker_gpu logs"
    return str(cause or err)
