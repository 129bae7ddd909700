"""The base model worker_gpu keeps loaded between the chunks of a run: given back after a chunk
it equals a fresh load (weights, modules, hooks, flags), chunks on it train the same bits as
chunks that each load their own, and another run, another key or an error frees the slot.

    python -m pytest tests/worker_gpu/test_model_cache.py -q
"""

from __future__ import annotations


import pytest
import torch

from store.layout import CHECKPOINT_ADAPTER_DIR
from tests.worker_gpu.planned import CPU_DEVICE, plan_and_rows
from worker_gpu.model_cache import BaseModelCache
from worker_gpu.model_loading import attach_adapter, load_base_model, plan_dtype
from worker_gpu.recipe_lora import LoraRecipe, eval_loss

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(params=[False, True], ids=["plain", "gradient_checkpointing"])
def planned(request, tiny_model, datasets, tmp_path):
    return plan_and_rows(
        "model_cache", tiny_model, datasets["instruction"], tmp_path / "store",
        lora_dropout=0.1, gradient_checkpointing=request.param,
    )


class CountingLoads:
    def __init__(self):
        self.count = 0

    def __call__(self, plan, device):
        self.count += 1
        return load_base_model(plan, device)


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything of a base model that PEFT may change in place."""
    return {
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "training": model.training,
        "config": model.config.to_dict(),
        "peft_config": hasattr(model, "peft_config"),
    }


def test_a_base_given_back_after_chunks_equals_a_fresh_load(planned, tmp_path):
    plan, rows, evals = planned
    cache = BaseModelCache()
    for until, ckpt in ((2, None), (4, tmp_path / "first")):
        with cache.borrow("run", plan, CPU_DEVICE) as base:
            recipe = LoraRecipe(plan, rows, CPU_DEVICE)
            recipe.run_chunk(ckpt, until - 2, until, tmp_path / ("first" if ckpt is None else "second"),
                             eval_rows=lambda: evals, base=base)
            recipe.cleanup()
    with cache.borrow("run", plan, CPU_DEVICE) as base:  # the tuned eval's use: a saved adapter, not trainable
        attach_adapter(base, plan, tmp_path / "second" / CHECKPOINT_ADAPTER_DIR, trainable=False)
    fresh = load_base_model(plan, CPU_DEVICE)
    with cache.borrow("run", plan, CPU_DEVICE) as base:
        assert fingerprint(base) == fingerprint(fresh)
        kept, loaded = base.state_dict(), fresh.state_dict()
        assert kept.keys() == loaded.keys()
        assert all(torch.equal(kept[k], loaded[k]) for k in kept)


def test_chunks_on_the_kept_base_train_the_same_bits_as_fresh_loads(planned, tmp_path):
    plan, rows, evals = planned
    straight = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 4, tmp_path / "straight", eval_rows=lambda: evals)

    loads = CountingLoads()
    cache = BaseModelCache(loads)
    with cache.borrow("run", plan, CPU_DEVICE) as base:
        baseline, _ = eval_loss(base, evals, plan.micro_batch_size, CPU_DEVICE, plan_dtype(plan, CPU_DEVICE))
    chunks = []
    for start, until, ckpt in ((0, 2, None), (2, 4, tmp_path / "first")):
        with cache.borrow("run", plan, CPU_DEVICE) as base:
            recipe = LoraRecipe(plan, rows, CPU_DEVICE)
            name = "first" if ckpt is None else "second"
            chunks.append(recipe.run_chunk(ckpt, start, until, tmp_path / name, eval_rows=lambda: evals, base=base))
            recipe.cleanup()
    assert loads.count == 1
    first, second = chunks
    assert first.losses + second.losses == straight.losses
    assert (second.staging_dir / CHECKPOINT_ADAPTER_DIR / WEIGHTS).read_bytes() == (
        straight.staging_dir / CHECKPOINT_ADAPTER_DIR / WEIGHTS
    ).read_bytes()

    # What the tuned eval reuses: the chunk's eval at its checkpoint is what evaluate measures
    # on a fresh base with the saved adapter, bit for bit, over the same tokens.
    fresh = load_base_model(plan, CPU_DEVICE)
    assert eval_loss(fresh, evals, plan.micro_batch_size, CPU_DEVICE, plan_dtype(plan, CPU_DEVICE))[0] == baseline
    tuned = attach_adapter(fresh, plan, second.staging_dir / CHECKPOINT_ADAPTER_DIR, trainable=False)
    as_evaluate = eval_loss(
        tuned, evals, plan.micro_batch_size, CPU_DEVICE, plan_dtype(plan, CPU_DEVICE),
        batching=plan.batching, max_seq_len=plan.max_seq_len,
    )
    assert as_evaluate == (second.eval_loss, second.eval_tokens)


def test_another_run_another_key_an_error_or_release_frees_the_slot(planned):
    plan = planned[0]
    loads = CountingLoads()
    cache = BaseModelCache(loads)
    for run in ("a", "a", "b"):
        with cache.borrow(run, plan, CPU_DEVICE):
            pass
    assert loads.count == 2 and cache.key[0] == "b"

    other = plan.model_copy(update={"hyperparameters": plan.hp.model_copy(update={"gradient_checkpointing": not plan.hp.gradient_checkpointing})})
    with cache.borrow("b", other, CPU_DEVICE):
        pass
    assert loads.count == 3

    with pytest.raises(RuntimeError, match="the chunk failed"), cache.borrow("b", other, CPU_DEVICE):
        raise RuntimeError("the chunk failed")
    assert cache.key is None
    with cache.borrow("b", other, CPU_DEVICE):
        pass
    assert loads.count == 4
    cache.release()
    assert cache.key is None
