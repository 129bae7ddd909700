"""Activities of worker_gpu: evaluate and train_chunk, one at a time per GPU; and
inspect_hardware, answered on the light hardware queue too so it never waits behind them.

train_chunk resumes from the newest committed checkpoint in the artifact store, whichever
worker wrote it; heartbeat details only report progress.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.base_model import load_tokenizer
from activities.errors import user_error
from activities.heartbeat import Heartbeater
from activities.lineage import hardware
from runtime import metrics
from schemas.activities import ChunkInput, ChunkResult, EvalResult, EvalSample, EvaluateInput
from schemas.api_models import HardwareInfo
from schemas.errors import OUT_OF_MEMORY, WORKER_SHUTDOWN
from schemas.settings import Settings
from store.artifacts import ArtifactCorrupt, ArtifactStore, sha256_file
from store.checkpoints import commit_checkpoint, fetch_checkpoint, fetch_latest_checkpoint, prune_checkpoints
from store.db import Database

SAMPLES = 3

log = structlog.get_logger(__name__)


class GpuActivities:
    def __init__(self, settings: Settings, db: Database, store: ArtifactStore):
        self.settings, self.db, self.store = settings, db, store
        (settings.home / "tmp").mkdir(parents=True, exist_ok=True)

    def _workdir(self):
        return tempfile.TemporaryDirectory(dir=self.settings.home / "tmp", prefix="activity-")

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
        checkpoint and return early, with the step reached."""
        import torch

        from worker_gpu import faults
        from worker_gpu.model_loading import pick_device
        from worker_gpu.recipe_lora import CURSOR_FILE, LoraRecipe, eval_loss

        started = time.monotonic()
        state = {"step": 0, "loss": None, "checkpoint": None}
        metrics.training_run(inp.run_id)
        with self._workdir() as tmp:
            tmp = Path(tmp)
            with Heartbeater(self.settings.heartbeat_every_s, lambda: dict(state)):
                found = fetch_latest_checkpoint(self.store, inp.run_id, tmp / "in")
                if found:
                    ref, manifest, ckpt_dir = found
                    state.update(step=ref.step, checkpoint=ref.manifest_key)
                    if ref.step >= inp.until_step:  # a retry after the commit: nothing left to do
                        losses = json.loads((ckpt_dir / CURSOR_FILE).read_text())["losses"][inp.from_step :]
                        return ChunkResult(
                            checkpoint=ref, step=ref.step, loss=_mean(losses), step_losses=losses,
                            resumed_from_step=ref.step, seconds=time.monotonic() - started,
                        )
                rows = self._fetch_rows(inp.snapshot.train_uri, inp.snapshot.train_sha256, tmp / "train.jsonl")
                faults.kill_point(self.settings, "model_load")
                recipe = LoraRecipe(inp.plan, rows, pick_device(), oom_above=faults.oom_limit(self.settings))
                metrics.reset_gpu_peak(recipe.device)  # the peak gauge is this chunk's
                recipe.setup(ckpt_dir if found else None)
            resumed_from = recipe.step
            attempt = activity.info().attempt
            # Every chunk but the first starts from a checkpoint: that is the plan, not news. Say so
            # only when this chunk picks up after an interruption (a retry, or a checkpoint the
            # workflow had not heard of).
            if attempt > 1 or resumed_from > inp.from_step:
                tries = f" (attempt {attempt})" if attempt > 1 else ""
                self.db.add_event(
                    inp.run_id, "info",
                    f"resumed from checkpoint at step {resumed_from} after an interruption{tries}"
                    if resumed_from else f"restarted from step 0 after an interruption{tries}",
                )
            log.info("chunk.training", from_step=resumed_from, until_step=inp.until_step, device=str(recipe.device))
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
                    )
                return activity.is_cancelled() or activity.is_worker_shutdown()

            # Cancellation is seen by after_step; the step in flight and the checkpoint finish first.
            try:
                recipe.train(inp.until_step, after_step)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                recipe.cleanup()
                # Not retried as is: the workflow retries with a smaller micro-batch.
                raise ApplicationError(
                    f"out of memory at micro-batch {inp.plan.micro_batch_size} "
                    f"(max_seq_len {inp.plan.max_seq_len}): {exc}",
                    {"micro_batch_size": inp.plan.micro_batch_size},
                    type=OUT_OF_MEMORY,
                    non_retryable=True,
                ) from None
            checkpoint_started = time.monotonic()
            recipe.save_checkpoint(tmp / "out")
            checkpoint_seconds = time.monotonic() - checkpoint_started
            eval_loss_now = None
            if inp.plan.spec.eval_at_checkpoints:
                eval_rows = self._fetch_rows(inp.snapshot.eval_uri, inp.snapshot.eval_sha256, tmp / "eval.jsonl")
                eval_loss_now, _ = eval_loss(recipe.model, eval_rows, inp.plan.micro_batch_size, recipe.device, recipe.dtype)
            commit_started = time.monotonic()
            ref = commit_checkpoint(
                self.store, inp.run_id, recipe.step, tmp / "out",
                meta={"hardware": hardware(), "resumed_from_step": resumed_from, "eval_loss": eval_loss_now},
                before_manifest=lambda: faults.kill_point(self.settings, "checkpoint_write"),
            )
            # Writing plus committing; the eval in between is not checkpoint time.
            checkpoint_seconds += time.monotonic() - commit_started
            metrics.CHECKPOINT_COMMIT.observe(checkpoint_seconds)
            metrics.observe_gpu_memory(recipe.device)
            log.info(
                "checkpoint.committed", step=ref.step, seconds=round(checkpoint_seconds, 3),
                loss=recipe.losses[-1] if recipe.losses else None, eval_loss=eval_loss_now,
            )
            state.update(checkpoint=ref.manifest_key)
            activity.heartbeat(dict(state))
            losses = recipe.losses[inp.from_step :]
            # The run's step is now the checkpoint's, also when the chunk stopped early.
            last_loss = recipe.losses[-1] if recipe.losses else None
            self.db.record_progress(
                inp.run_id, ref.step, inp.plan.total_steps, last_loss,
                {"loss": last_loss, "checkpoint": ref.step, "eval_loss": eval_loss_now},
            )
            prune_checkpoints(self.store, inp.run_id, inp.plan.spec.keep_checkpoints)
            recipe.cleanup()
        return ChunkResult(
            checkpoint=ref, step=ref.step, loss=_mean(losses), step_losses=losses,
            resumed_from_step=resumed_from, seconds=time.monotonic() - started,
        )

    @activity.defn(name="evaluate")
    def evaluate(self, inp: EvaluateInput) -> EvalResult:
        """Eval loss of the base model, or of base + the checkpoint's adapter, on the eval split;
        plus a few greedy samples. Resumes from nothing: it is read-only.

        Bounded by the plan: rows are cut to max_seq_len, sample prompts to their last tokens
        and answers to the spec's max_new_tokens. Cancel and worker shutdown stop it between
        batches and between generated tokens (within one heartbeat interval)."""
        from worker_gpu import faults
        from worker_gpu.model_loading import attach_adapter, load_base_model, pick_device, plan_dtype
        from worker_gpu.recipe_lora import ADAPTER_DIR, eval_loss
        from worker_gpu.samples import clip_start, generate_sample

        delay = faults.eval_delay(self.settings)

        def between() -> None:
            if delay:
                time.sleep(delay)
            _stop_if_asked(f"{inp.label} evaluation")

        max_len = inp.plan.max_seq_len
        with self._workdir() as tmp, Heartbeater(self.settings.heartbeat_every_s, lambda: {"label": inp.label}):
            tmp = Path(tmp)
            rows = self._fetch_rows(inp.snapshot.eval_uri, inp.snapshot.eval_sha256, tmp / "eval.jsonl")
            # The snapshot already cuts rows to max_seq_len; this keeps evaluate bounded whatever wrote it.
            rows = [{**r, "input_ids": r["input_ids"][:max_len], "labels": r["labels"][:max_len]} for r in rows]
            device = pick_device()
            model = load_base_model(inp.plan, device)
            if inp.checkpoint is not None:
                found = fetch_checkpoint(self.store, inp.run_id, inp.checkpoint.step, tmp / "ckpt")
                if found is None:
                    raise RuntimeError(f"checkpoint at step {inp.checkpoint.step} is missing or corrupt")
                # Loading the saved PEFT adapter here is also the check that the export loads.
                model = attach_adapter(model, inp.plan, tmp / "ckpt" / ADAPTER_DIR, trainable=False)
            loss, tokens = eval_loss(model, rows, inp.plan.micro_batch_size, device, plan_dtype(inp.plan, device), between_batches=between)
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


def _is_oom(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError saying so."""
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
