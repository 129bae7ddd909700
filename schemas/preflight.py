"""The preflight report: what a run will do, on what hardware, and why — or what to change."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from schemas.activities import TrainingPlan
from schemas.datasets import DatasetReport
from schemas.run_spec import RunSpec


class Explanation(BaseModel):
    field: str
    value: Any
    why: str = Field(description="Why preflight chose this value.")


class RenderedSample(BaseModel):
    line: int = Field(description="Line of the dataset file.")
    text: str = Field(description="Exactly what the model sees, after the chat template.")
    trained_text: str = Field(description="The part the model learns to produce (carries loss).")


class TokenLengths(BaseModel):
    min: int
    p50: int
    p95: int
    max: int
    mean: float
    histogram_edges: list[int] = Field(description="Bin edges in tokens; counts[i] is rows in [edges[i], edges[i+1]).")
    histogram_counts: list[int]


class DatasetPreflight(BaseModel):
    validation: DatasetReport
    samples: list[RenderedSample]
    token_lengths: TokenLengths
    measured_rows: int = Field(description="Rows tokenized for these statistics (all, or a deterministic sample).")
    truncated_rows: int = Field(description="Rows (of measured_rows) longer than max_seq_len.")
    truncated_share: float
    duplicate_rows: int = Field(description="Rows that repeat an earlier row exactly.")
    train_rows: int
    eval_rows: int


class MemoryPlan(BaseModel):
    device: str
    estimate_bytes: int
    available_bytes: int
    fits: bool
    adapter_bytes: int = Field(0, description="Size of the LoRA weights (a checkpoint holds them plus two Adam moments).")
    lines: list[str] = Field(description="The estimate, term by term.")


class PreflightInput(BaseModel):
    run_id: str
    spec: RunSpec
    hardware: dict[str, Any] | None = Field(None, description="The training worker's hardware report.")


class PreflightReport(BaseModel):
    ok: bool = Field(description="False when the run cannot start as specified; errors say what to change.")
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    hardware: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetPreflight | None = None
    memory: MemoryPlan | None = None
    defaults: list[Explanation] = Field(default_factory=list, description="Every value preflight chose, with why.")
    estimated_steps: int | None = None
    estimated_seconds: float | None = Field(None, description="Rough training time on this hardware (6 x params x tokens FLOPs).")
    plan: TrainingPlan | None = None
