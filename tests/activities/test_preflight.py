"""Preflight on a real tiny model and real data: plans, defaults with reasons, refusals
that say what to change, dataset checks. The hardware is given as the worker reports it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.memory_estimate import ModelShape, estimate_training_memory
from activities.preflight import preflight_report
from api.routes.models import fit_verdict
from schemas.hardware import HardwareInfo
from schemas.model_matrix import load_matrix
from schemas.run_spec import Method, RunSpec

# Where local models and datasets may be: the tests' own files live under the temp folder.
ROOTS = (Path(tempfile.gettempdir()).resolve(),)
CPU = {"device": "cpu", "cpu_count": 2, "memory_available_bytes": 16 * 2**30, "bitsandbytes_usable": True, "disk_free_bytes": 50 * 2**30}


def spec(model, data, **over) -> RunSpec:
    return RunSpec.model_validate({"base_model": str(model), "dataset": str(data), **over})


def report(model, data, hardware=CPU, **over):
    hw = HardwareInfo(**hardware) if hardware is not None else None
    return preflight_report("run_test", spec(model, data, **over), db=None, store=None, hardware=hw, roots=ROOTS)


def test_every_unset_knob_gets_a_value_and_a_reason(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"])
    assert r.ok, r.errors
    chosen = {d.field: d for d in r.defaults}
    for field in ("epochs", "learning_rate", "warmup_ratio", "lora_r", "lora_alpha", "max_seq_len",
                  "micro_batch_size", "grad_accum", "gradient_checkpointing", "batching"):
        assert field in chosen and chosen[field].why, field
    hp = r.plan.hyperparameters
    assert hp.epochs == 5  # 102 train rows: under 300
    assert hp.lora_r == 16 and hp.lora_alpha == 32  # balanced
    assert hp.micro_batch_size * hp.grad_accum == 16
    assert hp.max_seq_len == 256 and r.dataset.truncated_rows == 0
    assert r.estimated_steps == r.plan.total_steps and r.estimated_seconds > 0


def test_presets_change_the_defaults(tiny_model, datasets):
    quick = report(tiny_model, datasets["instruction"], preset="quick").plan.hyperparameters
    thorough = report(tiny_model, datasets["instruction"], preset="thorough").plan.hyperparameters
    assert (quick.epochs, quick.lora_r) == (1, 8)
    assert (thorough.epochs, thorough.lora_r) == (6, 32)
    assert thorough.micro_batch_size * thorough.grad_accum == 32


def test_the_plan_is_deterministic(tiny_model, datasets):
    a = report(tiny_model, datasets["chat"]).plan.model_dump(mode="json")
    b = report(tiny_model, datasets["chat"]).plan.model_dump(mode="json")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_samples_show_what_the_model_sees_and_learns(tiny_model, datasets):
    r = report(tiny_model, datasets["chat"])
    sample = r.dataset.samples[0]
    assert "<|im_start|>user\n" in sample.text and "<|im_start|>assistant\n" in sample.text
    assert sample.trained_text.endswith("<|im_end|>")
    assert "<|im_start|>user" not in sample.trained_text
    assert sum(r.dataset.token_lengths.histogram_counts) == r.dataset.measured_rows == 120


def test_truncating_max_seq_len_is_refused_with_a_fix(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"], hyperparameters={"max_seq_len": 16})
    assert not r.ok
    assert any("max_seq_len 16 truncates 100% of rows" in e and "Raise it to 256" in e for e in r.errors)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def distinct_rows(n):
    return [{"prompt": f"Add {i // 100} and {i % 100}:", "completion": f" {i // 100 + i % 100}"} for i in range(n)]


def test_a_mostly_duplicate_dataset_is_refused_with_the_real_multiplicity(tiny_model, tmp_path):
    rows = [{"prompt": f"Say {i % 10}", "completion": f" {i % 10}"} for i in range(60)]
    r = report(tiny_model, write_rows(tmp_path / "dup.jsonl", rows))
    assert not r.ok
    assert r.dataset.duplicate_rows == 50 and r.dataset.distinct_rows == 10
    assert any("mostly duplicates: 10 distinct rows among 60" in e and "the row at line 1 occurs 6 times" in e for e in r.errors)
    assert not any("weigh double" in m for m in r.errors + r.warnings)


def test_some_duplicates_are_warned_with_their_multiplicity_and_stay_out_of_eval(tiny_model, tmp_path):
    rows = distinct_rows(100)
    rows[3:3] = [rows[2]] * 199  # line 3 occurs 200 times: 101 distinct rows among 299 would be refused...
    r = report(tiny_model, write_rows(tmp_path / "dup.jsonl", rows))
    assert not r.ok and "the row at line 3 occurs 200 times" in r.errors[0]
    rows = distinct_rows(300) + [distinct_rows(300)[7]] * 49  # ...300 distinct among 349 is warned
    r = report(tiny_model, write_rows(tmp_path / "some.jsonl", rows))
    assert r.ok, r.errors
    assert any("49 rows of some.jsonl are exact copies" in w and "the row at line 8 occurs 50 times" in w
               and "300 distinct rows among 349" in w for w in r.warnings)
    assert r.dataset.eval_in_train_share == 0
    assert r.plan.train_rows + r.plan.eval_rows == 349 and abs(r.plan.eval_rows - 35) <= 50


def test_every_over_long_row_is_reported_with_its_line_and_what_is_cut(tiny_model, tmp_path):
    """More rows than preflight samples for statistics, a few of them ~1 MB: each one is found."""
    rows = distinct_rows(6000)
    megabyte = "sky blue green grass " * 50_000
    big_lines = [1200, 3001, 5999]
    for line in big_lines:
        rows[line - 1] = {"prompt": megabyte + f"{line}?", "completion": " yes"}
    rows[99] = {"prompt": "Spell it:", "completion": " word" * 600}  # line 100: half the answer fits
    r = report(tiny_model, write_rows(tmp_path / "long.jsonl", rows), hyperparameters={"max_seq_len": 512})
    assert r.ok, r.errors
    warning = next((w for w in r.warnings if "max_seq_len 512 truncates" in w), None)
    assert warning, r.warnings
    assert r.dataset.truncated_rows == r.dataset.long_rows_total == 4 and r.dataset.answer_lost_rows == 3
    assert [row.line for row in r.dataset.long_rows] == [100, 1200, 3001, 5999]
    assert "(4 of 6,000)" in warning and "3 of them lose their whole answer" in warning
    for line in big_lines:
        assert f"line {line}: about " in warning
    assert "cut to 512: the whole answer is cut, the row trains on nothing" in warning
    assert "line 100: about" not in warning and "of the answer is cut" in warning  # tokenized whole: exact
    cut = next(row for row in r.dataset.long_rows if row.line == 100)
    assert 0.1 < 1 - cut.answer_kept_share < 0.9 and cut.tokens_exact


def test_a_few_truncated_rows_are_listed_and_the_list_is_bounded(tiny_model, tmp_path):
    rows = distinct_rows(400)
    for i in range(0, 400, 20):
        rows[i] = {"prompt": "Spell it:", "completion": f" {i}" + " word" * 300}
    r = report(tiny_model, write_rows(tmp_path / "some-long.jsonl", rows), hyperparameters={"max_seq_len": 256})
    assert r.ok, r.errors
    warning = next(w for w in r.warnings if "max_seq_len 256 truncates 5% of rows (20 of 400)" in w)
    assert warning.count("cut to 256") == 10 and "and 10 more" in warning


def test_an_eval_dataset_replaces_the_held_out_split(tiny_model, tmp_path):
    from activities.demo_data import write_demo_dataset

    train = write_demo_dataset(tmp_path / "train.jsonl", rows=200, seed=0)
    fresh = write_demo_dataset(tmp_path / "fresh.jsonl", rows=230, seed=0).read_text().splitlines()[200:]
    held = write_rows(tmp_path / "valid.jsonl", [json.loads(x) for x in fresh])
    r = report(tiny_model, train, eval_dataset=str(held))
    assert r.ok, r.errors
    assert (r.plan.train_rows, r.plan.eval_rows) == (200, 30)
    assert r.dataset.eval_source == "valid.jsonl" and r.dataset.eval_excluded_rows == 0


def test_eval_rows_that_also_train_are_left_out_with_their_lines(tiny_model, tmp_path):
    from activities.demo_data import write_demo_dataset

    lines = write_demo_dataset(tmp_path / "all.jsonl", rows=150, seed=0).read_text().splitlines()
    train = write_rows(tmp_path / "train.jsonl", [json.loads(x) for x in lines[:120]])
    # Eval: 30 fresh rows, with copies of training rows on lines 2 and 5.
    held = [json.loads(x) for x in lines[120:]]
    held[1], held[4] = json.loads(lines[0]), json.loads(lines[9])
    r = report(tiny_model, train, eval_dataset=str(write_rows(tmp_path / "valid.jsonl", held)))
    assert r.ok, r.errors
    assert (r.plan.train_rows, r.plan.eval_rows) == (120, 28)
    assert r.dataset.eval_excluded_lines == [2, 5] and r.dataset.eval_in_train_share == 0
    assert any("valid.jsonl: 2 of 30 rows (7%) also occur in dataset train.jsonl" in w and "lines 2, 5" in w
               for w in r.warnings)

    r = report(tiny_model, train, eval_dataset=str(write_rows(tmp_path / "copy.jsonl", [json.loads(x) for x in lines[:5]])))
    assert not r.ok and any("every row of eval_dataset copy.jsonl also occurs in dataset train.jsonl (lines 1, 2, 3, 4, 5)" in e
                            for e in r.errors)


def test_an_eval_dataset_is_validated_like_the_dataset(tiny_model, tmp_path, datasets):
    r = report(tiny_model, datasets["instruction"], eval_dataset=str(datasets["chat"]))
    assert not r.ok and any("eval_dataset chat.jsonl has chat rows but dataset instruction.jsonl has instruction rows" in e
                            for e in r.errors)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\nnot json\n{"instruction": "b", "output": "c"}\n')
    r = report(tiny_model, datasets["instruction"], eval_dataset=str(bad))
    assert not r.ok and any(e.startswith("eval_dataset: bad.jsonl is mostly bad") and "line 1" in e for e in r.errors)
    assert r.dataset.eval_validation.bad_rows == 2


def test_near_duplicates_are_reported_not_refused(tiny_model, tmp_path):
    rows = distinct_rows(100) + [{"prompt": f"Add {i // 100} and {i % 100}:", "completion": " many"} for i in range(100)]
    r = report(tiny_model, write_rows(tmp_path / "near.jsonl", rows))
    assert r.ok, r.errors
    assert r.dataset.eval_prompt_in_train_rows > 0 and r.dataset.eval_in_train_share == 0
    assert any("have the same prompt as a train row with a different answer" in w for w in r.warnings)


def test_an_absurd_max_steps_is_refused_with_the_numbers(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 10**12})
    assert not r.ok and r.plan is None
    assert any("max_steps 1,000,000,000,000 at ~" in e and " years of training" in e
               and "lower max_steps, or remove it to train by epochs" in e for e in r.errors)
    assert report(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 1000}).ok


def test_bad_rows_are_reported_with_line_numbers(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\nnot json\n{"instruction": "b", "output": "c"}\n')
    r = report(tiny_model, path)
    assert not r.ok
    problems = r.dataset.validation.problems
    assert [p.line for p in problems] == [1, 2]
    assert "mostly bad" in r.errors[0] and "line 1" in r.errors[0]


def _shape(tiny_model):
    from activities.base_model import count_parameters

    config = json.loads((tiny_model / "config.json").read_text())
    return ModelShape.from_config(config, count_parameters(tiny_model)[0])


def test_a_run_that_cannot_fit_is_refused_with_what_would(tiny_model, datasets):
    shape = _shape(tiny_model)
    kw = dict(lora_r=16, target_modules="all-linear", seq_len=256, micro_batch=1, gradient_checkpointing=True, dtype="float32", device="cuda")
    lora = estimate_training_memory(shape, method="lora", **kw).total
    qlora = estimate_training_memory(shape, method="qlora", **kw).total
    assert qlora < lora
    between = {"device": "cuda", "gpu_name": "test", "gpu_memory_bytes": int((lora + qlora) / 2 / 0.9),
               "bf16_supported": False, "bitsandbytes_usable": True, "cpu_count": 2, "disk_free_bytes": 2**40}
    r = report(tiny_model, datasets["instruction"], hardware=between, hyperparameters={"max_seq_len": 256})
    assert not r.ok and r.memory and not r.memory.fits
    assert "use method 'qlora'" in r.errors[0] and "the worker has" in r.errors[0]
    assert report(tiny_model, datasets["instruction"], hardware=between, method="qlora",
                  hyperparameters={"max_seq_len": 256}).ok

    tiny_gpu = {**between, "gpu_memory_bytes": 1000}
    r = report(tiny_model, datasets["instruction"], hardware=tiny_gpu, hyperparameters={"max_seq_len": 256})
    assert not r.ok and "pick a smaller base model" in r.errors[0]


def test_memory_picks_the_largest_micro_batch_that_fits(tiny_model, datasets):
    shape = _shape(tiny_model)
    kw = dict(lora_r=16, target_modules="all-linear", seq_len=256, gradient_checkpointing=False, dtype="float32", device="cuda")
    four = estimate_training_memory(shape, method="lora", micro_batch=4, **kw).total
    eight = estimate_training_memory(shape, method="lora", micro_batch=8, **kw).total
    gpu = {"device": "cuda", "gpu_name": "test", "gpu_memory_bytes": int((four + eight) / 2 / 0.9),
           "bf16_supported": False, "bitsandbytes_usable": True, "cpu_count": 2, "disk_free_bytes": 2**40}
    r = report(tiny_model, datasets["instruction"], hardware=gpu, hyperparameters={"max_seq_len": 256})
    assert r.ok, r.errors
    assert (r.plan.micro_batch_size, r.plan.grad_accum) == (4, 4)


def test_batching_is_padding_free_unless_the_spec_says_padded(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"])
    chosen = {d.field: d for d in r.defaults}
    assert r.plan.batching == "padding_free" and chosen["batching"].value == "padding_free"
    assert "CPU" in chosen["batching"].why and "position_ids" in chosen["batching"].why
    r = report(tiny_model, datasets["instruction"], hyperparameters={"batching": "padded"})
    assert r.plan.batching == "padded" and "batching" not in {d.field for d in r.defaults}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_qlora_needs_bitsandbytes_on_the_worker(tiny_model, datasets, method):
    r = report(tiny_model, datasets["instruction"], hardware={**CPU, "bitsandbytes_usable": False}, method=method)
    assert r.ok == (method == "lora")


def test_cpu_fallback_and_broken_driver_are_stated_plainly(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"])
    assert any("no GPU: training runs on the CPU" in w for w in r.warnings)
    broken = {**CPU, "nvidia_driver": "550.54", "torch_version": "2.11.0", "cuda_version": "13.0"}
    r = report(tiny_model, datasets["instruction"], hardware=broken)
    assert any("NVIDIA driver (550.54)" in w and "cannot use the GPU" in w for w in r.warnings)


def test_too_little_disk_for_checkpoints_is_refused(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"], hardware={**CPU, "disk_free_bytes": 1000})
    assert not r.ok and "of disk" in r.errors[0]


def test_preflight_and_the_models_route_judge_memory_by_one_rule(tiny_model, datasets):
    """The same worker report gives the same usable memory in the plan and in GET /v1/models;
    when the worker does not report its free memory, the route says unknown and preflight,
    which still has to choose a micro-batch, says what it assumed instead of hiding it."""
    entry = load_matrix().get("mistralai/Mistral-7B-Instruct-v0.3")
    known = {**CPU, "memory_available_bytes": 10 * 2**30}
    planned = report(tiny_model, datasets["instruction"], hardware=known)
    assert planned.ok, planned.errors
    assert fit_verdict(entry, Method.lora, HardwareInfo(**known)).available_bytes == planned.memory.available_bytes
    assert not any("free memory" in w for w in planned.warnings)

    unknown = {k: v for k, v in CPU.items() if k != "memory_available_bytes"}
    verdict = fit_verdict(entry, Method.lora, HardwareInfo(**unknown))
    assert verdict.fits is None and "unknown" in verdict.reason
    assumed = report(tiny_model, datasets["instruction"], hardware=unknown)
    assert assumed.ok, assumed.errors
    [warning] = [w for w in assumed.warnings if "free memory" in w]
    assert "did not report its free memory" in warning and "13.7 GB" in warning  # 80% of 16 GiB, as planned
    assert assumed.plan.warnings == assumed.warnings


def test_the_out_of_memory_back_off_is_a_pure_function_of_the_plan(tiny_model, datasets):
    """Halving the micro-batch keeps the examples per step and carries every fact that depends
    on the batch shape (the memory estimate) along; the plan holds each of them once."""
    plan = report(tiny_model, datasets["instruction"], hyperparameters={"micro_batch_size": 8, "grad_accum": 2}).plan
    assert (plan.smaller_micro_batch(), plan.memory_estimate_bytes) == (4, plan.memory_estimates[8])
    smaller = plan.with_micro_batch(4)
    assert (smaller.micro_batch_size, smaller.grad_accum) == (4, 4)
    assert smaller.hyperparameters.micro_batch_size == 4 and smaller.memory_estimate_bytes == plan.memory_estimates[4]
    assert smaller.memory_estimate_bytes < plan.memory_estimate_bytes
    assert (plan.micro_batch_size, plan.grad_accum) == (8, 2)  # the old plan is unchanged
    assert sorted(plan.memory_estimates) == [1, 2, 4, 8]  # every micro-batch the back-off can reach
    dumped = smaller.model_dump()
    assert not {"micro_batch_size", "grad_accum", "max_seq_len", "memory_estimate_bytes"} & set(dumped)
    with pytest.raises(ValueError, match="does not divide"):
        plan.with_micro_batch(3)


def test_the_plan_names_its_dataset_and_the_snapshot_refuses_other_bytes(tiny_model, datasets, tmp_path):
    from activities.snapshot import snapshot_dataset
    from store.artifacts import LocalArtifactStore

    data = tmp_path / "data.jsonl"
    data.write_bytes(Path(datasets["instruction"]).read_bytes())
    plan = report(tiny_model, data).plan
    assert plan.dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "a row added after preflight", "output": "ok"}) + "\n")
    with pytest.raises(ApplicationError, match="changed after preflight planned the run"):
        snapshot_dataset(plan, None, LocalArtifactStore(tmp_path / "store"), roots=ROOTS)
