"""Generation metrics: how close each generated output is to its reference, and the same
over an eval set, for base and tuned models alike, so the two can be compared.

Run its tests: python -m pytest tests/activities/test_eval_metrics.py -q

Exact match and token F1 compare the texts after one minimal normalisation (normalise: strip
the ends, collapse every run of whitespace to one space; case and punctuation are kept, since
they are part of what a tuned model is asked to get right). ROUGE-L is rouge-score's and chrF
is sacrebleu's, never hand-written. Every similarity is on a 0-1 scale (chrF is sacrebleu's
0-100 score divided by 100), so one regression threshold reads the same for all of them.
rouge-score's tokenizer keeps only lower-cased a-z and 0-9, so ROUGE-L says nothing about text
in other scripts (it scores 0); chrF, on characters, does.

The stop rate is the share of outputs that ended with an end-of-sequence / end-of-turn token
before max_new_tokens: a tuned model that never stops is the failure users hit most.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import sacrebleu
from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rouge_score import rouge_scorer


def normalise(text: str) -> str:
    """text with its ends stripped and each run of whitespace collapsed to one space."""
    return " ".join(text.split())


class OutputChecks(BaseModel):
    """Structured-output checks on every generated output, each reported as a share of outputs
    that pass. A bad regex or JSON Schema is refused here, when the spec is read, not mid-run."""

    # The spec's key is `json`; the attribute has another name because `json` shadows a
    # BaseModel method (pydantic warns on every import).
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    valid_json: bool = Field(False, alias="json", description="Each output must parse as JSON (after stripping its ends).")
    json_schema: dict[str, Any] | None = Field(
        None, description="A JSON Schema each output must parse and validate against (implies the JSON check)."
    )
    regex: str | None = Field(
        None, description="A Python regular expression each output (its ends stripped) must match in full."
    )

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}; write a Python `re` pattern") from e
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                validator_for(value).check_schema(value)
            except SchemaError as e:
                where = "/".join(str(p) for p in e.path) or "the top level"
                raise ValueError(f"not a valid JSON Schema: {e.message} (at {where})") from e
        return value

    @property
    def checks_json(self) -> bool:
        """Whether outputs are parsed as JSON: asked for, or needed by the schema check."""
        return self.valid_json or self.json_schema is not None


class Generated(BaseModel):
    """One generated output, as the metrics need it."""

    text: str = Field(description="The generated text, special tokens skipped.")
    new_tokens: int = Field(ge=0, description="Tokens generated before the stop token (or the bound).")
    stopped: bool = Field(description="Ended with an EOS / end-of-turn token before max_new_tokens.")


class OutputScore(BaseModel):
    """One output's metrics against its reference."""

    exact_match: bool = Field(description="Output and reference are equal after normalise().")
    token_f1: float = Field(ge=0, description="SQuAD-style F1 of the two bags of whitespace tokens after normalise().")
    rouge_l: float = Field(ge=0, description="rouge-score's ROUGE-L F-measure (its tokenizer: lower case, letters and digits).")
    chrf: float = Field(ge=0, description="sacrebleu's sentence chrF, divided by 100.")
    output_tokens: int = Field(ge=0, description="Tokens generated (Generated.new_tokens).")
    output_chars: int = Field(ge=0, description="Characters of the output.")
    stopped: bool = Field(description="Ended with an EOS / end-of-turn token before max_new_tokens.")
    json_valid: bool | None = Field(None, description="Parses as JSON; None: not checked.")
    schema_valid: bool | None = Field(None, description="Parses and validates against the JSON Schema; None: not checked.")
    regex_match: bool | None = Field(None, description="Matches the regex in full; None: not checked.")


class MetricSummary(BaseModel):
    """An eval set's metrics: the mean of each per-output metric, corpus chrF, the stop rate."""

    rows: int = Field(ge=1, description="Outputs scored.")
    exact_match: float = Field(ge=0, description="Share of outputs that match their reference exactly.")
    token_f1: float = Field(ge=0, description="Mean token F1.")
    rouge_l: float = Field(ge=0, description="Mean ROUGE-L F-measure.")
    chrf: float = Field(ge=0, description="sacrebleu's corpus chrF over all outputs, divided by 100.")
    output_tokens: float = Field(ge=0, description="Mean tokens generated.")
    output_chars: float = Field(ge=0, description="Mean characters generated.")
    stop_rate: float = Field(ge=0, description="Share of outputs that ended with EOS / end-of-turn before the bound.")
    json_valid: float | None = Field(None, ge=0, description="Share that parse as JSON; None: not checked.")
    schema_valid: float | None = Field(None, ge=0, description="Share valid against the JSON Schema; None: not checked.")
    regex_match: float | None = Field(None, ge=0, description="Share that match the regex; None: not checked.")


class MetricDeltas(BaseModel):
    """Tuned minus base for each metric of two MetricSummary; None where either was not checked."""

    exact_match: float
    token_f1: float
    rouge_l: float
    chrf: float
    output_tokens: float
    output_chars: float
    stop_rate: float
    json_valid: float | None = None
    schema_valid: float | None = None
    regex_match: float | None = None


class ScoredOutputs(BaseModel):
    """Per-output scores, in the order of the outputs, and their summary."""

    rows: list[OutputScore]
    summary: MetricSummary


def token_f1(output: str, reference: str) -> float:
    """SQuAD-style F1 of the bags of whitespace tokens of the normalised texts; 1.0 when both are
    empty, 0.0 when only one is."""
    out, ref = normalise(output).split(), normalise(reference).split()
    if not out or not ref:
        return float(out == ref)
    common = sum((Counter(out) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(out), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value) under strict JSON: NaN and Infinity, which Python's json accepts, are refused."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False, None


def score_output(output: Generated, reference: str, checks: OutputChecks | None = None) -> OutputScore:
    """One output's metrics against its reference, and the structured-output checks asked for."""
    checked: dict[str, bool] = {}
    text = output.text.strip()
    if checks is not None and checks.checks_json:
        parsed, value = _parse_json(text)
        checked["json_valid"] = parsed
        if checks.json_schema is not None:
            checked["schema_valid"] = parsed and validator_for(checks.json_schema)(checks.json_schema).is_valid(value)
    if checks is not None and checks.regex is not None:
        checked["regex_match"] = re.fullmatch(checks.regex, text) is not None
    return OutputScore(
        exact_match=normalise(output.text) == normalise(reference),
        token_f1=token_f1(output.text, reference),
        rouge_l=rouge_scorer.RougeScorer(["rougeL"]).score(reference, output.text)["rougeL"].fmeasure,
        chrf=sacrebleu.sentence_chrf(output.text, [reference]).score / 100,
        output_tokens=output.new_tokens,
        output_chars=len(output.text),
        stopped=output.stopped,
        **checked,
    )


def _share(values: list[bool | None]) -> float | None:
    return None if values[0] is None else sum(bool(v) for v in values) / len(values)


def score_outputs(outputs: Sequence[Generated], references: Sequence[str], checks: OutputChecks | None = None) -> ScoredOutputs:
    """Every output's metrics against the reference at the same index, and their summary."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references: each output needs its reference")
    if not outputs:
        raise ValueError("no outputs to score: the eval set is empty")
    rows = [score_output(o, r, checks) for o, r in zip(outputs, references)]
    n = len(rows)
    summary = MetricSummary(
        rows=n,
        exact_match=sum(s.exact_match for s in rows) / n,
        token_f1=math.fsum(s.token_f1 for s in rows) / n,
        rouge_l=math.fsum(s.rouge_l for s in rows) / n,
        chrf=sacrebleu.corpus_chrf([o.text for o in outputs], [list(references)]).score / 100,
        output_tokens=sum(s.output_tokens for s in rows) / n,
        output_chars=sum(s.output_chars for s in rows) / n,
        stop_rate=sum(s.stopped for s in rows) / n,
        json_valid=_share([s.json_valid for s in rows]),
        schema_valid=_share([s.schema_valid for s in rows]),
        regex_match=_share([s.regex_match for s in rows]),
    )
    return ScoredOutputs(rows=rows, summary=summary)


def compare(base: MetricSummary, tuned: MetricSummary) -> MetricDeltas:
    """Tuned minus base for each metric. Both must score the same eval set (the same row count):
    deltas between different sets say nothing about the tuning."""
    if base.rows != tuned.rows:
        raise ValueError(f"base scored {base.rows} outputs and tuned {tuned.rows}: compare summaries of the same eval set")
    deltas = {}
    for name in MetricDeltas.model_fields:
        b, t = getattr(base, name), getattr(tuned, name)
        deltas[name] = None if b is None or t is None else t - b
    return MetricDeltas(**deltas)
