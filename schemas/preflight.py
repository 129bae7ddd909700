"""The preflight report: what a run will do, on what hardware, and why — or what to change."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from schemas.activities import FetchedModel, TrainingPlan
from schemas.datasets import DatasetReport, TokenLengths
from schemas.hardware import HardwareInfo
from schemas.run_spec import RunSpec


class Explanation(BaseModel):
    """One value preflight chose because the spec left it unset, and why."""

    field: str = Field(description="The hyperparameter, as named in the spec (e.g. learning_rate).")
    value: Any = Field(description="The value chosen.")
    why: str = Field(description="Why preflight chose this value.")


class RenderedSample(BaseModel):
    line: int = Field(description="Line of the dataset file.")
    text: str = Field(description="Exactly what the model sees, after the chat template.")
    trained_text: str = Field(description="The part the model learns to produce (carries loss).")


class LongRow(BaseModel):
    """A row longer than max_seq_len, and what truncation leaves of it."""

    source: str = Field(description="The file the row is in (dataset or eval_dataset).")
    line: int = Field(description="Line in that file.")
    tokens: int = Field(description="Tokens of the whole row (estimated when tokens_exact is false).")
    tokens_exact: bool = Field(description="False for very long rows, of which only the part that is kept is tokenized.")
    answer_kept_share: float = Field(description="Share of the answer left after truncation; 0: the row has nothing to learn.")
    effect: str = Field(description="What truncation does to this row, in words.")


class RepeatedRow(BaseModel):
    line: int = Field(description="Line of the row's first occurrence in the dataset file.")
    occurrences: int = Field(description="How many rows are exact copies of it (itself included).")


class DatasetPreflight(BaseModel):
    validation: DatasetReport
    samples: list[RenderedSample]
    token_lengths: TokenLengths
    measured_rows: int = Field(description="Rows tokenized for these statistics (all, or a deterministic sample).")
    truncated_rows: int = Field(
        description="Rows of dataset longer than max_seq_len: every row is checked (a cheap length bound, "
        "then tokenizing each row that may exceed)."
    )
    truncated_share: float = Field(description="truncated_rows / valid rows of dataset.")
    long_rows: list[LongRow] = Field(
        default_factory=list, description="The first 50 rows (dataset, then eval_dataset) longer than max_seq_len."
    )
    long_rows_total: int = Field(0, description="All rows (dataset and eval_dataset) longer than max_seq_len.")
    answer_lost_rows: int = Field(0, description="Of those, rows whose answer is cut entirely: they train on nothing.")
    duplicate_rows: int = Field(description="Rows that repeat an earlier row exactly (after rendering).")
    distinct_rows: int = Field(0, description="Distinct rows of dataset after rendering.")
    most_repeated: list[RepeatedRow] = Field(default_factory=list, description="The most repeated rows, most first.")
    train_rows: int
    eval_rows: int
    eval_source: str | None = Field(None, description="The eval_dataset file; None when eval is held out of dataset.")
    eval_validation: DatasetReport | None = Field(None, description="Validation of the eval_dataset file.")
    eval_excluded_rows: int = Field(0, description="eval_dataset rows left out of eval because they occur in dataset.")
    eval_excluded_lines: list[int] = Field(default_factory=list, description="Their lines in eval_dataset (the first 50).")
    eval_in_train_share: float = Field(0.0, description="Share of eval rows that also occur exactly in the train split.")
    eval_prompt_in_train_rows: int = Field(
        0, description="Eval rows whose prompt occurs in the train split with a different answer (near-duplicates)."
    )


class MemoryPlan(BaseModel):
    device: str
    estimate_bytes: int
    available_bytes: int
    fits: bool
    adapter_bytes: int = Field(0, description="Size of the LoRA weights (a checkpoint holds them plus two Adam moments).")
    lines: list[str] = Field(description="The estimate, term by term.")


class PreflightInput(BaseModel):
    """Input of the preflight activities."""

    run_id: str
    spec: RunSpec
    hardware: HardwareInfo | None = Field(None, description="The training worker's hardware report; None: unknown.")
    base_model: FetchedModel | None = Field(
        None, description="The run's base model as fetch_base_model stored it; None: a local directory or cache."
    )

    @field_validator("hardware", mode="before")
    @classmethod
    def _empty_is_unknown(cls, v):
        return v or None


class DryRunInput(BaseModel):
    """Input of the PreflightLLM workflow (the dry run): the spec, and the queues to ask."""

    run_id: str
    spec: RunSpec
    cpu_task_queue: str = Field(description="Task queue of worker_cpu, which builds the report.")
    gpu_task_queue: str = Field(description="Task queue of worker_gpu, whose hardware the report plans for.")


class PreflightReport(BaseModel):
    ok: bool = Field(description="False when the run cannot start as specified; errors say what to change.")
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    hardware: HardwareInfo | None = Field(None, description="The hardware the report planned for; None: unknown.")
    dataset: DatasetPreflight | None = None
    memory: MemoryPlan | None = None
    defaults: list[Explanation] = Field(default_factory=list, description="Every value preflight chose, with why.")
    estimated_steps: int | None = None
    estimated_seconds: float | None = Field(None, description="Rough training time on this hardware (6 x params x tokens FLOPs).")
    plan: TrainingPlan | None = None

    @field_validator("hardware", mode="before")
    @classmethod
    def _empty_is_unknown(cls, v):
        return v or None  # reports stored before hardware was typed say {} for unknown
