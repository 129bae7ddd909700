"""Activities of worker_gpu: evaluate and train_chunk, one at a time per GPU; and
inspect_hardware, answered on the light hardware queue too so it never waits behind them.

train_chunk resumes from the newest committed checkpoint in the artifact store, whichever
worker wrote it; heartbeat details only report progress. The base model stays loaded
between the activities of a run (BaseModelCache); everything else a chunk starts from comes
from the checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.base_model import load_tokenizer
from activities.errors import user_error
from activities.heartbeat import Heartbeater
from activities.hub_fetch import with_local_base_model
from activities.lineage import hardware
from runtime import metrics
from schemas.activities import CHUNK_EVAL_FIELDS, ChunkInput, ChunkResult, EvalResult, EvalSample, EvaluateInput
from schemas.hardware import HardwareInfo
from schemas.errors import OUT_OF_MEMORY, WORKER_SHUTDOWN
from schemas.settings import Settings
from store.artifacts import ArtifactCorrupt, ArtifactStore, sha256_file
from store.blocking import BlockingDatabase
from store.checkpoints import (
    checkpoint_losses,
    commit_checkpoint,
    fetch_checkpoint,
    fetch_latest_checkpoint,
    prune_checkpoints,
)
from store.layout import CHECKPOINT_ADAPTER_DIR
from worker_gpu.model_cache import BaseModelCache

SAMPLES = 3

log = structlog.get_logger(__name__)


class GpuActivities:
    def __init__(self, settings: Settings, db: BlockingDatabase, store: ArtifactStore):
        self.settings, self.db, self.store = settings, db, store
        self.base_models = BaseModelCache()
        (settings.home / "tmp").mkdir(parents=True, exist_ok=True)

    def _workdir(self):
        return tempfile.TemporaryDirectory(dir=self.settings.home / "tmp", prefix="activity-")

    def _on_this_worker(self, inp: ChunkInput | EvaluateInput):
        """inp with its plan's base model on this machine: materialised from the artifact store for
        a model fetched from the Hub (never the path another machine planned with)."""
        with Heartbeater(self.settings.heartbeat_every_s):
            return inp.model_copy(update={"plan": with_local_base_model(inp.plan, self.store, self.settings.home)})

    def _fetch_rows(self, key: str, sha256: str, dest: Path) -> list[dict]:
        from worker_gpu.recipe_lora import read_rows

        try:
            path = self.store.get_file(key, dest)
        except ArtifactCorrupt as exc:
            raise user_error(f"the run's dataset snapshot is damaged ({exc}); start the run again") from None
        if sha256_file(path) != sha256:
            raise user_error(f"{key} does not match the snapshot's sha256; start the run again")
        return read_rows(path)

    # No exception is thrown into this thread on cancel: the chunk itself stops after the step in
    # flight, commits a checkpoint and returns it, so the workflow learns the step it stopped at.
    @activity.defn(name="train_chunk", no_thread_cancel_exception=True)
    def train_chunk(self, inp: ChunkInput) -> ChunkResult:
        """Train to inp.until_step from the newest committed checkpoint (or from scratch),
        then commit a checkpoint. Pause, cancel or worker shutdown finish the current step,
        checkpoint and return early, with the step reached.

        The recipe runs the chunk (LoraRecipe.run_chunk); this wires it to the artifact store
        (fetch, commit, prune), heartbeats, metrics and progress. A retry after the commit finds
        the checkpoint covering until_step and returns it; progress and events carry keys (step,
        checkpoint, attempt), so the DB records each once however often it is retried."""
        from worker_gpu import faults
        from worker_gpu.model_loading import pick_device
        from worker_gpu.recipe_lora import LoraRecipe, StepOutOfMemory

        started = time.monotonic()
        inp = self._on_this_worker(inp)
        state = {"step": 0, "loss": None, "checkpoint": None}

        def heartbeats() -> Heartbeater:
            return Heartbeater(self.settings.heartbeat_every_s, lambda: dict(state))

        with self._workdir() as tmp, metrics.training(inp.run_id), ExitStack() as held:
            tmp = Path(tmp)
            with heartbeats():
                found = fetch_latest_checkpoint(self.store, inp.run_id, tmp / "in")
                if found:
                    ref, manifest, ckpt_dir = found
                    state.update(step=ref.step, checkpoint=ref.manifest_key)
                    if ref.step >= inp.until_step:  # a retry after the commit: nothing left to do
                        losses = checkpoint_losses(self.store, inp.run_id, ref.step)[inp.from_step :]
                        meta = manifest.get("meta", {})
                        return ChunkResult(
                            checkpoint=ref, step=ref.step, loss=_mean(losses), step_losses=losses,
                            resumed_from_step=ref.step, seconds=time.monotonic() - started,
                            **{k: meta.get(k) for k in CHUNK_EVAL_FIELDS},
                        )
                rows = self._fetch_rows(inp.snapshot.train_uri, inp.snapshot.train_sha256, tmp / "train.jsonl")
                faults.kill_point(self.settings, "model_load")
                recipe = LoraRecipe(inp.plan, rows, pick_device())
                metrics.reset_gpu_peak(recipe.device)  # the peak gauge is this chunk's
                # Held until the chunk is committed; given back clean, or dropped if the chunk fails.
                base = held.enter_context(self.base_models.borrow(inp.run_id, inp.plan, recipe.device))
            attempt = activity.info().attempt

            def resumed(step: int) -> None:
                # Every chunk but the first starts from a checkpoint: that is the plan, not news. Say
                # so only when this chunk picks up after an interruption (a retry, or a checkpoint
                # the workflow had not heard of).
                if attempt > 1 or step > inp.from_step:
                    tries = f" (attempt {attempt})" if attempt > 1 else ""
                    self.db.add_event(
                        inp.run_id, "info",
                        f"resumed from checkpoint at step {step} after an interruption{tries}"
                        if step else f"restarted from step 0 after an interruption{tries}",
                        key=f"resumed:{step}:{attempt}",
                    )
                log.info("chunk.training", from_step=step, until_step=inp.until_step, device=str(recipe.device))

            last_report = 0.0

            def after_step(step: int, loss: float) -> bool:
                nonlocal last_report
                faults.kill_point(self.settings, "step", step)
                state.update(step=step, loss=loss)
                metrics.observe_step(inp.run_id, loss, recipe.last_step_seconds, recipe.last_step_tokens)
                metrics.observe_gpu_memory(recipe.device)
                if time.monotonic() - last_report >= self.settings.progress_every_s or step == inp.until_step:
                    last_report = time.monotonic()
                    activity.heartbeat(dict(state))
                    # Measured on the worker: real (non-padding) tokens of the step over its time.
                    tokens_per_s = recipe.last_step_tokens / recipe.last_step_seconds if recipe.last_step_seconds else None
                    self.db.record_progress(
                        inp.run_id, step, inp.plan.total_steps, loss,
                        {"loss": loss, "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None},
                        key=f"progress:{step}",
                    )
                return activity.is_cancelled() or activity.is_worker_shutdown()

            def eval_rows() -> list[dict]:
                return self._fetch_rows(inp.snapshot.eval_uri, inp.snapshot.eval_sha256, tmp / "eval.jsonl")

            # Cancellation is seen by after_step; the step in flight and the checkpoint finish first.
            try:
                chunk = recipe.run_chunk(
                    ckpt_dir if found else None, inp.from_step, inp.until_step, tmp / "out",
                    eval_rows=eval_rows,
                    loading=heartbeats(),
                    started=resumed,
                    before_step=faults.injected_oom(self.settings, inp.plan.micro_batch_size),
                    after_step=after_step,
                    base=base,
                )
            except StepOutOfMemory as exc:
                # Not retried as is: the workflow retries with a smaller micro-batch.
                raise ApplicationError(
                    str(exc), {"micro_batch_size": inp.plan.micro_batch_size}, type=OUT_OF_MEMORY, non_retryable=True
                ) from None
            commit_started = time.monotonic()
            ref = commit_checkpoint(
                self.store, inp.run_id, chunk.step, chunk.staging_dir,
                meta={
                    "hardware": hardware(), "resumed_from_step": chunk.resumed_from,
                    **{k: getattr(chunk, k) for k in CHUNK_EVAL_FIELDS},
                },
                before_manifest=lambda: faults.kill_point(self.settings, "checkpoint_write"),
            )
            # Writing plus committing; the eval in between is not checkpoint time.
            checkpoint_seconds = chunk.save_seconds + time.monotonic() - commit_started
            metrics.CHECKPOINT_COMMIT.observe(checkpoint_seconds)
            metrics.observe_gpu_memory(recipe.device)
            # The run's step is now the checkpoint's, also when the chunk stopped early.
            last_loss = recipe.losses[-1] if recipe.losses else None
            log.info(
                "checkpoint.committed", step=ref.step, seconds=round(checkpoint_seconds, 3),
                loss=last_loss, eval_loss=chunk.eval_loss,
            )
            state.update(checkpoint=ref.manifest_key)
            activity.heartbeat(dict(state))
            self.db.record_progress(
                inp.run_id, ref.step, inp.plan.total_steps, last_loss,
                {"loss": last_loss, "checkpoint": ref.step, "eval_loss": chunk.eval_loss, "eval_rows": chunk.eval_rows},
                key=f"checkpoint:{ref.step}",
            )
            prune_checkpoints(self.store, inp.run_id, inp.plan.spec.keep_checkpoints)
            recipe.cleanup()
        return ChunkResult(
            checkpoint=ref, step=ref.step, loss=_mean(chunk.losses), step_losses=chunk.losses,
            resumed_from_step=chunk.resumed_from, seconds=time.monotonic() - started,
            **{k: getattr(chunk, k) for k in CHUNK_EVAL_FIELDS},
        )

    @activity.defn(name="evaluate")
    def evaluate(self, inp: EvaluateInput) -> EvalResult:
        """Eval loss of the base model, or of base + the checkpoint's adapter, on the eval split;
        plus a few greedy samples. Resumes from nothing: it is read-only. With inp.eval_loss (the
        checkpoint's own eval, measured by the chunk that committed it) it only generates samples.

        Bounded by the plan: rows are cut to max_seq_len, sample prompts to their last tokens
        and answers to the spec's max_new_tokens. Cancel and worker shutdown stop it between
        batches and between generated tokens (within one heartbeat interval)."""
        from worker_gpu import faults
        from worker_gpu.model_loading import attach_adapter, pick_device, plan_dtype
        from worker_gpu.recipe_lora import eval_loss
        from worker_gpu.samples import clip_start, generate_sample

        delay = faults.eval_delay(self.settings)
        inp = self._on_this_worker(inp)

        def between() -> None:
            if delay:
                time.sleep(delay)
            _stop_if_asked(f"{inp.label} evaluation")

        max_len = inp.plan.max_seq_len
        device = pick_device()
        with (
            self._workdir() as tmp,
            Heartbeater(self.settings.heartbeat_every_s, lambda: {"label": inp.label}),
            self.base_models.borrow(inp.run_id, inp.plan, device) as model,
        ):
            tmp = Path(tmp)
            rows = self._fetch_rows(inp.snapshot.eval_uri, inp.snapshot.eval_sha256, tmp / "eval.jsonl")
            # The snapshot already cuts rows to max_seq_len; this keeps evaluate bounded whatever wrote it.
            rows = [{**r, "input_ids": r["input_ids"][:max_len], "labels": r["labels"][:max_len]} for r in rows]
            if inp.checkpoint is not None:
                found = fetch_checkpoint(self.store, inp.run_id, inp.checkpoint.step, tmp / "ckpt")
                if found is None:
                    raise RuntimeError(f"checkpoint at step {inp.checkpoint.step} is missing or corrupt")
                # Loading the saved PEFT adapter here is also the check that the export loads.
                model = attach_adapter(model, inp.plan, tmp / "ckpt" / CHECKPOINT_ADAPTER_DIR, trainable=False)
            if inp.eval_loss is not None and inp.eval_tokens is not None:
                loss, tokens = inp.eval_loss, inp.eval_tokens
            else:
                # Batched as the chunk's checkpoint eval is, so the two measure the same way.
                loss, tokens = eval_loss(
                    model, rows, inp.plan.micro_batch_size, device, plan_dtype(inp.plan, device), between_batches=between,
                    batching=inp.plan.batching, max_seq_len=max_len,
                )
            tokenizer = load_tokenizer(inp.plan.base_model_path)
            samples = []
            for row in rows[:SAMPLES]:
                prompt, text = generate_sample(
                    model, tokenizer, row["prompt"], device, max_len, inp.plan.spec.max_new_tokens, between_tokens=between
                )
                samples.append(EvalSample(prompt=prompt, reference=clip_start(row["reference"]), generated=text))
        return EvalResult(
            label=inp.label, loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, samples=samples
        )

    @activity.defn(name="inspect_hardware")
    def inspect_hardware(self) -> HardwareInfo:
        """What this GPU worker has: GPU, memory, bf16, bitsandbytes, disk. Read-only and quick;
        served on the hardware task queue too, so it never waits behind training."""
        from runtime.hardware import worker_hardware

        # The first call imports bitsandbytes (seconds); heartbeats carry a cancel in meanwhile.
        with Heartbeater(self.settings.heartbeat_every_s):
            return worker_hardware(self.settings.home)

    def all(self) -> list:
        return [self.train_chunk, self.evaluate, self.inspect_hardware]


def _stop_if_asked(what: str) -> None:
    """Raise between units of work when the activity is cancelled or its worker is stopping."""
    if activity.is_cancelled():
        raise CancelledError(f"{what} cancelled")
    if activity.is_worker_shutdown():
        # Retryable on purpose: another GPU worker (or this one, restarted) runs it again.
        raise ApplicationError(f"worker_gpu is shutting down; the {what} is retried on a GPU worker", type=WORKER_SHUTDOWN)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
