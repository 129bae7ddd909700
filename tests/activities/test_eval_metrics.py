"""Generation metrics agree with the libraries and with hand counts on known strings.

Run: python -m pytest tests/activities/test_eval_metrics.py -q
"""

from __future__ import annotations

import pytest
import sacrebleu
from pydantic import ValidationError
from rouge_score import rouge_scorer

from activities.eval_metrics import (
    Generated,
    MetricSummary,
    OutputChecks,
    compare,
    normalise,
    score_output,
    score_outputs,
)

REFERENCE = "the cat sat on the mat"
# Against REFERENCE: the longest common subsequence is "the cat on the mat", 5 of 8 output
# words and 5 of 6 reference words (rouge-score lower-cases, so "The" counts).
PARTIAL = "The cat is on the red mat today"


def out(text: str, new_tokens: int = 5, stopped: bool = True) -> Generated:
    return Generated(text=text, new_tokens=new_tokens, stopped=stopped)


def test_exact_match_normalises_only_whitespace():
    assert normalise("  Paris\n\tis  big ") == "Paris is big"
    assert score_output(out("  Paris \n"), "Paris").exact_match
    assert score_output(out("a  b"), "a\nb").exact_match
    assert not score_output(out("paris"), "Paris").exact_match  # case is part of the answer
    assert not score_output(out("Paris."), "Paris").exact_match


def test_rouge_l_is_the_lcs_f_measure_and_agrees_with_rouge_score():
    precision, recall = 5 / 8, 5 / 6
    by_hand = 2 * precision * recall / (precision + recall)
    assert by_hand == pytest.approx(5 / 7)
    library = rouge_scorer.RougeScorer(["rougeL"]).score(REFERENCE, PARTIAL)["rougeL"].fmeasure
    assert library == pytest.approx(by_hand)
    assert score_output(out(PARTIAL), REFERENCE).rouge_l == pytest.approx(by_hand)
    assert score_output(out(REFERENCE), REFERENCE).rouge_l == 1.0


def test_token_f1_counts_a_bag_of_case_kept_tokens():
    # Shared: one "the" (the other is "The"), cat, on, mat: 4 of 8 output and 4 of 6 reference tokens.
    precision, recall = 4 / 8, 4 / 6
    assert score_output(out(PARTIAL), REFERENCE).token_f1 == pytest.approx(2 * precision * recall / (precision + recall))
    assert score_output(out("mat the on sat cat the"), REFERENCE).token_f1 == 1.0  # order does not count
    assert score_output(out("dog"), REFERENCE).token_f1 == 0.0
    assert score_output(out(""), "").token_f1 == 1.0
    assert score_output(out(""), REFERENCE).token_f1 == 0.0


def test_chrf_is_sacrebleus_on_a_zero_to_one_scale():
    score = score_output(out(PARTIAL), REFERENCE).chrf
    assert score == pytest.approx(sacrebleu.sentence_chrf(PARTIAL, [REFERENCE]).score / 100)
    assert 0 < score < 1
    assert score_output(out(REFERENCE), REFERENCE).chrf == pytest.approx(1.0)


def test_lengths_and_stop_come_from_the_output():
    score = score_output(out("héllo", new_tokens=7, stopped=False), "hello")
    assert (score.output_tokens, score.output_chars, score.stopped) == (7, 5, False)
    assert score.json_valid is score.schema_valid is score.regex_match is None


def test_json_check_is_strict_json():
    checks = OutputChecks.model_validate({"json": True})
    assert score_output(out(' {"a": [1, 2]}\n'), "", checks).json_valid
    assert score_output(out("[1, 2]"), "", checks).json_valid
    assert not score_output(out('{"a": 1'), "", checks).json_valid
    assert not score_output(out("NaN"), "", checks).json_valid  # Python's json takes it; JSON does not
    assert not score_output(out("Sure! {\"a\": 1}"), "", checks).json_valid
    assert score_output(out("{}"), "", checks).schema_valid is None


def test_schema_check_parses_and_validates():
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
    checks = OutputChecks(json_schema=schema)
    good = score_output(out('{"answer": "Paris"}'), "", checks)
    assert good.json_valid and good.schema_valid
    wrong_type = score_output(out('{"answer": 1}'), "", checks)
    assert wrong_type.json_valid and not wrong_type.schema_valid
    not_json = score_output(out("Paris"), "", checks)
    assert not not_json.json_valid and not not_json.schema_valid


def test_regex_check_matches_the_whole_stripped_output():
    checks = OutputChecks(regex=r"\d+")
    assert score_output(out("42"), "", checks).regex_match
    assert score_output(out(" 42\n"), "", checks).regex_match
    assert not score_output(out("42 apples"), "", checks).regex_match
    assert score_output(out("42"), "", checks).json_valid is None


def test_a_bad_regex_or_schema_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as bad_regex:
        OutputChecks(regex="(unclosed")
    assert bad_regex.value.errors()[0]["loc"] == ("regex",)
    assert "not a valid regular expression" in str(bad_regex.value)

    with pytest.raises(ValidationError) as bad_schema:
        OutputChecks(json_schema={"type": "object", "properties": {"answer": {"type": "text"}}})
    assert bad_schema.value.errors()[0]["loc"] == ("json_schema",)
    assert "not a valid JSON Schema" in str(bad_schema.value) and "properties/answer/type" in str(bad_schema.value)

    with pytest.raises(ValidationError, match="extra"):
        OutputChecks.model_validate({"jsn": True})


def test_checks_read_and_write_the_spec_key_json():
    checks = OutputChecks.model_validate({"json": True, "regex": "[a-z]+"})
    assert checks.valid_json
    assert checks.model_dump() == {"json": True, "json_schema": None, "regex": "[a-z]+"}
    assert OutputChecks.model_validate(checks.model_dump()) == checks


def test_summary_means_corpus_chrf_and_stop_rate():
    outputs = [out(REFERENCE, 6, True), out(PARTIAL, 8, False), out("42", 1, True)]
    references = [REFERENCE, REFERENCE, "41"]
    scored = score_outputs(outputs, references, OutputChecks(regex=r"\d+"))
    rows, summary = scored.rows, scored.summary
    assert rows == [score_output(o, r, OutputChecks(regex=r"\d+")) for o, r in zip(outputs, references)]
    assert summary.rows == 3
    assert summary.exact_match == pytest.approx(1 / 3)
    assert summary.token_f1 == pytest.approx(sum(r.token_f1 for r in rows) / 3)
    assert summary.rouge_l == pytest.approx(sum(r.rouge_l for r in rows) / 3)
    corpus = sacrebleu.corpus_chrf([o.text for o in outputs], [references]).score / 100
    assert summary.chrf == pytest.approx(corpus)
    assert summary.output_tokens == pytest.approx(5.0)
    assert summary.output_chars == pytest.approx((len(REFERENCE) + len(PARTIAL) + 2) / 3)
    assert summary.stop_rate == pytest.approx(2 / 3)
    assert summary.regex_match == pytest.approx(1 / 3)
    assert summary.json_valid is None and summary.schema_valid is None


def test_outputs_and_references_must_pair_up():
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        score_outputs([out("a"), out("b")], ["a"])
    with pytest.raises(ValueError, match="empty"):
        score_outputs([], [])


def summary(**metrics) -> MetricSummary:
    fields = {"rows": 10, "exact_match": 0.2, "token_f1": 0.5, "rouge_l": 0.4, "chrf": 0.45, "output_tokens": 30.0,
              "output_chars": 120.0, "stop_rate": 0.9}
    return MetricSummary(**(fields | metrics))


def test_compare_gives_tuned_minus_base():
    base = summary(regex_match=0.5)
    tuned = summary(exact_match=0.6, rouge_l=0.3, stop_rate=0.1, output_tokens=64.0, regex_match=0.75, json_valid=1.0)
    deltas = compare(base, tuned)
    assert deltas.exact_match == pytest.approx(0.4)
    assert deltas.rouge_l == pytest.approx(-0.1)
    assert deltas.stop_rate == pytest.approx(-0.8)  # the collapse the gate must catch
    assert deltas.output_tokens == pytest.approx(34.0)
    assert deltas.token_f1 == deltas.chrf == deltas.output_chars == 0.0
    assert deltas.regex_match == pytest.approx(0.25)
    assert deltas.json_valid is None and deltas.schema_valid is None  # not checked on base
    with pytest.raises(ValueError, match="same eval set"):
        compare(base, summary(rows=9))
