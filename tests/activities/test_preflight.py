"""Preflight on a real tiny model and real data: plans, defaults with reasons, refusals
that say what to change, dataset checks. The hardware is given as the worker reports it."""

from __future__ import annotations

import json

import pytest

from activities.memory_estimate import ModelShape, estimate_training_memory
from activities.preflight import preflight_report
from schemas.run_spec import RunSpec

CPU = {"device": "cpu", "cpu_count": 2, "memory_available_bytes": 16 * 2**30, "bitsandbytes_usable": True, "disk_free_bytes": 50 * 2**30}


def spec(model, data, **over) -> RunSpec:
    return RunSpec.model_validate({"base_model": str(model), "dataset": str(data), **over})


def report(model, data, hardware=CPU, **over):
    return preflight_report("run_test", spec(model, data, **over), db=None, store=None, hardware=hardware)


def test_every_unset_knob_gets_a_value_and_a_reason(tiny_model, datasets):
    r = report(tiny_model, datasets["instruction"])
    assert r.ok, r.errors
    chosen = {d.field: d for d in r.defaults}
    for field in ("epochs", "learning_rate", "warmup_ratio", "lora_r", "lora_alpha", "max_seq_len",
                  "micro_batch_size", "grad_accum", "gradient_checkpointing"):
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
    assert any("max_seq_len 16 truncates 100% of rows" in e and "raise it to 256" in e for e in r.errors)


def test_duplicates_are_counted(tiny_model, tmp_path):
    rows = [{"prompt": f"Say {i % 10}", "completion": f" {i % 10}"} for i in range(60)]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = report(tiny_model, path)
    assert r.dataset.duplicate_rows == 50
    assert any("50 rows repeat an earlier row" in w for w in r.warnings)


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
