"""The run spec: what a user asks for when they start a tuning run.

Every field has a default (where one makes sense) and a description; the same model is
the body of `POST /v1/runs`, the YAML file given to `lockn-tune tune`, and the input of
the `TuneLLM` workflow.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Method(str, Enum):
    """How the base model is tuned."""

    lora = "lora"
    qlora = "qlora"


class LRScheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Preset(str, Enum):
    """How much training to buy when you leave knobs unset."""

    quick = "quick"  # a first look: one pass, small rank
    balanced = "balanced"  # the default
    thorough = "thorough"  # more passes, higher rank, larger batch


Batching = Literal["padded", "padding_free"]


class Hyperparameters(BaseModel):
    """Training knobs. Leave one unset (null) and preflight chooses it from the preset, the
    model and the dataset, and says why in the preflight report."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, le=100, description="Passes over the training split (default: by dataset size).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="Peak learning rate (default: by model size).")
    lr_scheduler: LRScheduler = Field(LRScheduler.cosine, description="Learning-rate schedule after warmup.")
    warmup_ratio: float | None = Field(None, ge=0, le=0.5, description="Share of steps spent warming up (default 0.03).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay on LoRA weights.")
    lora_r: int | None = Field(None, ge=1, le=1024, description="LoRA rank (default: by preset, 8/16/32).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA scaling numerator, scale = alpha / r (default: 2 x rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names that get LoRA adapters, or 'all-linear' for every linear layer but the output head.",
    )
    max_seq_len: int | None = Field(
        None, ge=16, le=131072, description="Tokens per example; longer ones are truncated (default: fits the data)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, le=1024, description="Examples per forward pass (default: the largest that fits in memory)."
    )
    grad_accum: int | None = Field(
        None, ge=1, le=1024, description="Forward passes per optimizer step (default: reaches the preset's batch)."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward to save memory (default: only when needed to fit)."
    )
    batching: Batching | None = Field(
        None,
        description="'padded' (micro-batches of whole examples, right-padded) or 'padding_free' (examples "
        "concatenated into rows, no attention or loss across them); the same loss either way (default: by hardware).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, ge=0, description="Seed for LoRA init, data order and dropout.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty: name at least one module, or use 'all-linear'")
        return v


class ResolvedHyperparameters(Hyperparameters):
    """Hyperparameters with every choice made (preflight's output; what training reads)."""

    epochs: int
    learning_rate: float
    warmup_ratio: float
    lora_r: int
    lora_alpha: int
    max_seq_len: int
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    # Plans made before padding-free batching existed trained padded, and keep meaning that.
    batching: Batching = "padded"


class RunSpec(BaseModel):
    """A tuning run, as the user describes it."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    kind: Literal["llm"] = Field("llm", description="What is tuned. 'llm' for LoRA/QLoRA on a causal LM.")
    project: str = Field("default", pattern=SLUG, description="Project the run belongs to.")
    name: str = Field("run", min_length=1, max_length=120, description="Human name for the run.")
    base_model: str = Field(
        ..., min_length=1,
        description="Hugging Face model id (fetched from the Hub into the artifact store when a run starts, unless "
        "the worker's Hugging Face cache has it) or a local model directory.",
    )
    dataset: str = Field(
        ..., min_length=1, description="An uploaded dataset id (ds_...) or a path to a local JSONL file."
    )
    eval_dataset: str | None = Field(
        None,
        min_length=1,
        description="Optional validation file (an uploaded dataset id ds_... or a path), in the same shape as dataset; "
        "when given, eval uses it instead of holding out eval_fraction of dataset, leaving out its rows that also "
        "occur in dataset.",
    )
    method: Method = Field(Method.lora, description="'lora' (full-precision base) or 'qlora' (4-bit NF4 base).")
    preset: Preset = Field(Preset.balanced, description="quick, balanced or thorough: the defaults for unset knobs.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    eval_fraction: float = Field(
        0.1, gt=0, lt=0.5,
        description="Share of valid rows held out for evaluation (exact copies stay together); unused with eval_dataset.",
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Optimizer steps per training chunk; a checkpoint is committed after each."
    )
    keep_checkpoints: int = Field(
        3, ge=1, le=1000, description="Committed checkpoints kept: the newest N, plus the one with the best eval loss."
    )
    max_new_tokens: int = Field(
        48,
        ge=1,
        le=4096,
        description="Tokens generated per eval sample (baseline and tuned, side by side); at most half of "
        "max_seq_len is used, and prompts are cut to their last tokens so prompt plus answer fit max_seq_len.",
    )
    eval_at_checkpoints: bool = Field(
        True, description="Measure eval loss at every checkpoint (for the best-checkpoint choice and the loss curve)."
    )
    max_bad_row_fraction: float = Field(
        0.5, ge=0, le=1, description="Refuse the dataset when more than this share of rows is invalid."
    )

    def sha256(self) -> str:
        """sha256 of the canonical JSON form, recorded in lineage."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
