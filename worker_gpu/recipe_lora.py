"""LoRA / QLoRA training recipe for causal LMs: setup -> train -> save_checkpoint.

A chunk of training (`LoraRecipe.run_chunk`) is: set up from a checkpoint directory (or
fresh), train up to a step, save a checkpoint into a staging directory, and evaluate it when
the plan asks. Everything that decides the next step is in the checkpoint (adapter,
optimizer, scheduler, RNG states, data cursor), so a chunk resumed after a crash continues
exactly where the committed checkpoint left off. The recipe knows no artifact store, DB or
Temporal: the caller fetches and commits checkpoints and reports through the hooks.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from activities.dataset_render import IGNORE
from schemas.activities import TrainingPlan
from store.layout import CHECKPOINT_ADAPTER_DIR, CHECKPOINT_CURSOR_FILE, CHECKPOINT_STATE_FILE
from worker_gpu.model_loading import attach_adapter, load_base_model, plan_dtype
from worker_gpu.packing import packed_micro_batches


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def collate(rows: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding carries no attention and no loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def label_tokens(rows: list[dict]) -> int:
    """Tokens that carry loss after the causal shift."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows)


def micro_batches(
    examples: list[dict], micro_batch_size: int, max_seq_len: int, batching: str, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The forward passes over examples: padded micro-batches of micro_batch_size examples, or
    padding-free rows packed up to micro_batch_size x max_seq_len tokens (worker_gpu/packing.py)."""
    if batching == "padding_free":
        return packed_micro_batches(examples, micro_batch_size, max_seq_len, device)
    return [collate(examples[i : i + micro_batch_size], device) for i in range(0, len(examples), micro_batch_size)]


def summed_loss(model, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum of token cross-entropies over the labelled tokens of a batch, padded (attention_mask)
    or packed (position_ids, no mask). No cache: training needs none, and a cache would stop
    transformers from building the packed rows' block-diagonal mask."""
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), use_cache=False,
        ).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")


class StepOutOfMemory(RuntimeError):
    """A training step did not fit in memory at the plan's micro-batch (a smaller one may)."""


@dataclass(frozen=True)
class ChunkOutcome:
    """What a chunk did; its checkpoint is saved in staging_dir, not yet committed."""

    step: int  # the step reached (until_step, or earlier when the chunk was stopped)
    resumed_from: int  # the step of the checkpoint it set up from (0 when fresh)
    losses: list[float]  # the loss of every step after from_step, up to step
    eval_loss: float | None  # at the checkpoint on the checkpoint eval rows, when the plan evaluates at checkpoints
    eval_tokens: int | None  # the labelled eval tokens eval_loss is the mean over
    eval_rows: int | None  # the checkpoint eval rows (checkpoint_eval_rows)
    final_eval_loss: float | None  # over the whole eval split, at the plan's last step
    final_eval_tokens: int | None
    staging_dir: Path
    save_seconds: float  # writing the checkpoint into staging_dir


class LoraRecipe:
    """One readable training recipe for LoRA and QLoRA (the plan says which)."""

    def __init__(self, plan: TrainingPlan, train_rows: list[dict], device: torch.device):
        self.plan = plan
        self.hp = plan.hp
        self.rows = train_rows
        self.device = device
        self.dtype = plan_dtype(plan, device)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.losses: list[float] = []  # every step's loss since step 1, kept in the checkpoint
        self.last_step_seconds = 0.0  # for step-time and tokens/s metrics
        self.last_step_tokens = 0
        self.last_step_lengths: list[int] = []  # each example's tokens in the last step
        self._orders: dict[int, list[int]] = {}

    # setup

    def setup(self, checkpoint_dir: Path | None, base=None) -> None:
        """Load the base model (or take base, already loaded for this plan and untouched by any
        adapter) and attach the adapter; restore optimizer, scheduler, RNG and cursor."""
        from transformers import get_scheduler

        if base is None:
            base = load_base_model(self.plan, self.device)
        adapter_dir = checkpoint_dir / CHECKPOINT_ADAPTER_DIR if checkpoint_dir else None
        self.model = attach_adapter(base, self.plan, adapter_dir, trainable=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay)
        self.scheduler = get_scheduler(
            self.hp.lr_scheduler.value,
            self.optimizer,
            num_warmup_steps=self.plan.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        if checkpoint_dir is None:
            self._seed_everything(self.hp.seed)
            return
        state = torch.load(checkpoint_dir / CHECKPOINT_STATE_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.losses = json.loads((checkpoint_dir / CHECKPOINT_CURSOR_FILE).read_text())["losses"]
        self._restore_rng(state["rng"])

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _restore_rng(self, rng: dict) -> None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # data

    def _order(self, epoch: int) -> list[int]:
        """The permutation of the train split for an epoch, derived from the seed alone."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.hp.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self._orders[epoch]

    def _next_examples(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = order[self.position : self.position + count - len(out)]
            out.extend(self.rows[i] for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    # train

    def train_step(self) -> float:
        """One optimizer step over micro_batch_size x grad_accum examples; returns its mean token loss.
        Padded or padding-free (the plan's batching), a step is the same examples and the same loss."""
        started = time.perf_counter()
        self.model.train()
        plan = self.plan
        examples = self._next_examples(plan.micro_batch_size * plan.grad_accum)
        # Normalise by the labelled tokens of the whole step, so accumulation equals one big batch.
        n_tokens = max(1, label_tokens(examples))
        total = 0.0
        for batch in micro_batches(examples, plan.micro_batch_size, plan.max_seq_len, plan.batching, self.device):
            loss = summed_loss(self.model, batch, self.dtype)
            (loss / n_tokens).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_step_seconds = time.perf_counter() - started
        self.last_step_lengths = [len(r["input_ids"]) for r in examples]
        self.last_step_tokens = sum(self.last_step_lengths)
        return total / n_tokens

    def train(
        self, until_step: int, after_step: Callable[[int, float], bool], before_step: Callable[[], None] | None = None
    ) -> None:
        """Train up to until_step. after_step(step, loss) returns True to stop early (pause,
        cancel, shutdown): the step in progress always finishes first. before_step() runs
        before every step and may raise to fail it (the fault tests inject errors there)."""
        while self.step < until_step:
            if before_step is not None:
                before_step()
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.step}; lower the learning rate")
            self.losses.append(loss)
            if after_step(self.step, loss):
                break

    # checkpoint

    def save_checkpoint(self, dest: Path) -> None:
        """Write adapter, trainer state and cursor into dest (a local staging directory)."""
        dest.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(dest / CHECKPOINT_ADAPTER_DIR, safe_serialization=True)
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16/fp32 training needs no gradient scaler
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        torch.save(state, dest / CHECKPOINT_STATE_FILE)
        cursor = {"step": self.step, "epoch": self.epoch, "position": self.position, "losses": self.losses}
        (dest / CHECKPOINT_CURSOR_FILE).write_text(json.dumps(cursor, indent=1))

    # a chunk

    def run_chunk(
        self,
        checkpoint_dir: Path | None,
        from_step: int,
        until_step: int,
        staging_dir: Path,
        *,
        eval_rows: Callable[[], list[dict]],
        loading: AbstractContextManager = nullcontext(),
        started: Callable[[int], None] = lambda step: None,
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[int, float], bool] = lambda step, loss: False,
        base=None,
    ) -> ChunkOutcome:
        """Set up from checkpoint_dir (None: fresh), train to until_step, save the checkpoint
        into staging_dir, and evaluate it on eval_rows() when the plan evaluates at checkpoints.

        from_step is where the chunk was planned to start: its losses are those of the steps
        after it (more than it trained when checkpoint_dir is further on). The hooks: the model
        loads inside `loading` (the caller heartbeats there); started(step) runs once set up,
        with the step it resumes from; before_step and after_step as in `train`. A step that
        runs out of memory raises StepOutOfMemory, with the recipe cleaned up. base: the base
        model already loaded for this plan (the worker keeps it between chunks); None loads it."""
        with loading:
            self.setup(checkpoint_dir, base)
        resumed_from = self.step
        started(resumed_from)
        try:
            self.train(until_step, after_step, before_step)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            self.cleanup()
            plan = self.plan
            raise StepOutOfMemory(
                f"out of memory at micro-batch {plan.micro_batch_size} (max_seq_len {plan.max_seq_len}): {exc}"
            ) from None
        save_started = time.monotonic()
        self.save_checkpoint(staging_dir)
        save_seconds = time.monotonic() - save_started
        measured = {"eval_loss": None, "eval_tokens": None, "eval_rows": None, "final_eval_loss": None,
                    "final_eval_tokens": None}
        if self.plan.spec.eval_at_checkpoints:
            measured = self.checkpoint_eval(eval_rows())
        return ChunkOutcome(
            step=self.step, resumed_from=resumed_from, losses=self.losses[from_step:], staging_dir=staging_dir,
            save_seconds=save_seconds, **measured,
        )

    def checkpoint_eval(self, rows: list[dict]) -> dict:
        """Eval loss on the run's checkpoint eval rows; at the plan's last step also over the
        whole split (the rest measured separately and combined exactly), which is the tuned
        eval loss, so evaluating the finished adapter again is not needed."""
        k = checkpoint_eval_rows(rows, self.rows, self.plan)
        measure = lambda part: eval_loss(  # noqa: E731
            self.model, part, self.plan.micro_batch_size, self.device, self.dtype,
            batching=self.plan.batching, max_seq_len=self.plan.max_seq_len,
        )
        loss, tokens = measure(rows[:k])
        out = {"eval_loss": loss, "eval_tokens": tokens, "eval_rows": k, "final_eval_loss": None, "final_eval_tokens": None}
        if self.step >= self.plan.total_steps:
            rest_loss, rest_tokens = measure(rows[k:]) if k < len(rows) else (0.0, 0)
            total = tokens + rest_tokens
            out.update(final_eval_loss=(loss * tokens + rest_loss * rest_tokens) / max(1, total), final_eval_tokens=total)
        return out

    def cleanup(self) -> None:
        del self.model, self.optimizer, self.scheduler
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# A checkpoint's eval is sized to at most this share of the tokens its chunk trains on: a
# forward pass costs about a third of a training step's forward and backward over as many
# tokens, so checkpoint evals add about 5 % to training.
CHECKPOINT_EVAL_TOKEN_SHARE = 0.15
CHECKPOINT_EVAL_MIN_ROWS = 4


def checkpoint_eval_rows(eval_rows: list[dict], train_rows: list[dict], plan: TrainingPlan) -> int:
    """How many eval rows every checkpoint of the run measures: the first rows of the eval split
    (its order is fixed by the snapshot) whose tokens fit in CHECKPOINT_EVAL_TOKEN_SHARE of one
    chunk's training tokens (checkpoint_every_steps x examples per step x the mean train row),
    at least CHECKPOINT_EVAL_MIN_ROWS. A function of the plan and the snapshot alone, so every
    checkpoint, resumed or not, measures the same rows and their losses compare like with like."""
    per_step = plan.micro_batch_size * plan.grad_accum  # constant under the out-of-memory back-off
    mean_train = sum(len(r["input_ids"]) for r in train_rows) / max(1, len(train_rows))
    budget = CHECKPOINT_EVAL_TOKEN_SHARE * plan.spec.checkpoint_every_steps * per_step * mean_train
    used, k = 0, 0
    for row in eval_rows:
        used += len(row["input_ids"])
        if used > budget and k >= CHECKPOINT_EVAL_MIN_ROWS:
            break
        k += 1
    return k


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError saying so."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


@torch.no_grad()
def eval_loss(
    model, rows: list[dict], batch_size: int, device: torch.device, dtype: torch.dtype,
    between_batches: Callable[[], None] | None = None, *, batching: str = "padded", max_seq_len: int | None = None,
) -> tuple[float, int]:
    """Mean token loss over the labelled tokens of rows in the compute dtype (the plan's),
    and how many tokens that is. between_batches() runs before every batch: it raises to stop
    (cancel, shutdown). batching "padding_free" packs batch_size rows of max_seq_len tokens
    per forward pass; max_seq_len None: the longest row."""
    model.eval()
    width = max_seq_len or max((len(r["input_ids"]) for r in rows), default=1)
    total = 0.0
    for batch in micro_batches(rows, batch_size, width, batching, device):
        if between_batches is not None:
            between_batches()
        total += summed_loss(model, batch, dtype).item()
    tokens = label_tokens(rows)
    return total / max(1, tokens), tokens
