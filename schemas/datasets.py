"""Dataset validation reports, shared by the API (upload) and the workers (preflight, snapshot).

Light on purpose: pydantic and the standard library only.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class DatasetShape(str, Enum):
    """The three JSONL row shapes a dataset may use (one shape per file)."""

    chat = "chat"  # {"messages": [{"role": ..., "content": ...}, ...]}
    instruction = "instruction"  # {"instruction": ..., "input": ..., "output": ..., "system": ...}
    completion = "completion"  # {"prompt": ..., "completion": ...}


class RowProblem(BaseModel):
    """One bad row: where it is, and what to do about it."""

    line: int = Field(description="1-based line number in the file (blank lines count).")
    kind: str = Field(
        description=(
            "Kind of problem: invalid_json, not_utf8, not_object, wrong_shape, missing_field, wrong_type, "
            "empty_value, wrong_role or bad_order."
        )
    )
    reason: str = Field(description="What is wrong and what to do, as a sentence starting with 'line N:'.")


class DatasetReport(BaseModel):
    """What reading a dataset found: counts, shape, the first problems, and whether it is refused."""

    source: str = Field(description="The file name (or path) the report is about.")
    sha256: str = Field(description="sha256 of the file's raw bytes, as uploaded.")
    size_bytes: int = Field(description="Size of the file in bytes.")
    shape: DatasetShape | None = Field(None, description="The shape of most rows; None when no row has a known shape.")
    total_rows: int = Field(description="Non-blank lines in the file.")
    valid_rows: int = Field(description="Rows that will be used for training and evaluation.")
    bad_rows: int = Field(description="Rows that will be skipped; the first 50 are listed in problems.")
    bad_row_fraction: float = Field(description="bad_rows / total_rows (0 for an empty file).")
    problems: list[RowProblem] = Field(default_factory=list, description="The first 50 bad rows, in line order.")
    problem_counts: dict[str, int] = Field(
        default_factory=dict, description="Number of bad rows per kind of problem, over the whole file."
    )
    refused: bool = Field(description="True when the dataset cannot be used as it is; message says why.")
    message: str = Field(description="One summary a person can act on; when refused, why and what to do.")


class TokenLengths(BaseModel):
    """Tokens per row of a set of rows: the one summary preflight (a sample of the dataset) and
    the snapshot (the exact train split) both report."""

    min: int
    p50: int
    p95: int
    max: int
    mean: float
    histogram_edges: list[int] = Field(
        default_factory=list, description="Bin edges in tokens; counts[i] is rows in [edges[i], edges[i+1])."
    )
    histogram_counts: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, lengths: list[int]) -> "TokenLengths":
        """The summary of a non-empty list of row lengths, with a histogram in doubling bins from 32 tokens."""
        ordered = sorted(lengths)
        n = len(ordered)
        edges, edge = [0], 32
        while edges[-1] <= ordered[-1]:
            edges.append(edge)
            edge *= 2
        counts = [0] * (len(edges) - 1)
        for length in ordered:
            counts[next(i for i in range(len(counts)) if length < edges[i + 1])] += 1
        return cls(
            min=ordered[0], p50=ordered[n // 2], p95=ordered[min(n - 1, int(0.95 * n))], max=ordered[-1],
            mean=round(sum(ordered) / n, 2), histogram_edges=edges, histogram_counts=counts,
        )
