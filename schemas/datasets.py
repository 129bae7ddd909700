"""Dataset validation reports, shared by the API (upload) and the workers (preflight, snapshot)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class DatasetShape(str, Enum):
    chat = "chat"  # {"messages": [{"role": ..., "content": ...}, ...]}
    instruction = "instruction"  # {"instruction": ..., "input": ..., "output": ...}
    completion = "completion"  # {"prompt": ..., "completion": ...}


class RowProblem(BaseModel):
    line: int = Field(description="1-based line number in the file.")
    kind: str = Field(description="invalid_json, not_utf8, not_object, missing_field, empty_value, wrong_role, bad_order, wrong_shape")
    reason: str = Field(description="What is wrong and what to do, starting with the line number.")


class DatasetReport(BaseModel):
    source: str = Field(description="The file name the report is about.")
    sha256: str = Field(description="sha256 of the file's raw bytes.")
    size_bytes: int = Field(description="Size of the file.")
    shape: DatasetShape | None = Field(None, description="The shape of most rows; None when no row is usable.")
    total_rows: int = Field(description="Non-blank lines.")
    valid_rows: int = Field(description="Rows that will be used.")
    bad_rows: int = Field(description="Rows skipped, each listed in problems (up to the first 50).")
    bad_row_fraction: float = Field(description="bad_rows / total_rows.")
    problems: list[RowProblem] = Field(default_factory=list, description="The first 50 bad rows, with reasons.")
    problem_counts: dict[str, int] = Field(default_factory=dict, description="Bad rows by kind of problem.")
    refused: bool = Field(description="True when the dataset cannot be used as it is.")
    message: str = Field(description="One summary a person can act on.")
