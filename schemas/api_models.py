"""Shapes GET /v1/models returns: the model matrix, the workers' hardware, and what fits on it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.hardware import HardwareInfo
from schemas.model_matrix import ModelEntry
from schemas.run_spec import Method


class FitSettings(BaseModel):
    """The run GET /v1/models judges fits for: small, but a real instruction-tuning run."""

    seq_len: int = Field(1024, description="Tokens per example.")
    micro_batch: int = Field(1, description="Examples per forward pass.")
    lora_r: int = Field(16, description="LoRA rank.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")


class FitVerdict(BaseModel):
    """Whether one model, tuned with one method, fits a worker's memory."""

    fits: bool | None = Field(description="True when the memory estimate is within the usable memory; null: unknown.")
    estimate_bytes: int | None = Field(None, description="Estimated peak training memory; null when not estimated.")
    available_bytes: int | None = Field(
        None, description="Memory training can use: the GPU's memory on cuda, MemAvailable on CPU."
    )
    reason: str = Field(description="The verdict in words, with the numbers behind it.")


class ModelView(ModelEntry):
    """A model matrix entry, with what fits the workers' hardware."""

    fits: dict[Method, FitVerdict] = Field(
        description="For each method (lora, qlora), whether a run with default settings fits the hardware."
    )


class ModelList(BaseModel):
    hardware: HardwareInfo = Field(description="The hardware the verdicts were computed for.")
    fit_settings: FitSettings = Field(description="The run the verdicts were computed for.")
    models: list[ModelView]
