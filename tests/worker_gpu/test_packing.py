"""Padding-free batching: a packed row computes what each of its examples computes alone, the
recipe's loss is the padded loss, and a chunk resumed from its checkpoint continues bit for bit.

    python -m pytest tests/worker_gpu/test_packing.py -q

Tolerances (float32, CPU): logits of a packed row match each example's own forward pass
within atol 1e-5 (measured: 1.9e-7 on SDPA and eager); packed and padded step losses within a
relative 1e-5. A cross-example leak (an all-ones mask or a cache) moves logits by far more
than that (measured: 0.53), which the tests assert too, so they would catch one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from activities.dataset_render import IGNORE
from store.layout import CHECKPOINT_ADAPTER_DIR
from tests.worker_gpu.planned import CPU_DEVICE, plan_and_rows
from worker_gpu.packing import collate_packed, pack_rows, packed_micro_batches
from worker_gpu.recipe_lora import LoraRecipe, collate, eval_loss, label_tokens, summed_loss

LOGITS_ATOL = 1e-5
LOSS_RTOL = 1e-5


def examples(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    """Rows shaped like the snapshot's: input_ids, and labels IGNORE on the prompt half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]})
    return out


def load_model(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.train()  # training mode: the config's use_cache=True still makes a cache unless told not to


def own_logits(model, example: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]


def row_logits(model, batch: dict, **call) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **call).logits


def test_rows_are_the_fewest_that_fit_the_budget_and_filled_evenly():
    lengths = [300, 100, 200, 250, 50, 512]
    rows = pack_rows(lengths, 512)
    assert rows == [[5], [0, 1, 4], [3, 2]]  # 1,412 tokens: three rows, 512 / 450 / 450
    batches = packed_micro_batches(examples(lengths, 100), 2, 512, CPU_DEVICE)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 512), (1, 450)]
    # A typical step: 8 short examples make two rows of ~400, not 512 + 288 padded to 512.
    step = [110, 90, 100, 120, 80, 100, 95, 105]
    assert [sum(step[i] for i in r) for r in pack_rows(step, 512)] == [405, 395]


def test_a_packed_row_restarts_positions_and_ignores_each_first_label():
    a, b = examples([4, 3], 100)
    batch = collate_packed([[a, b], [b]], CPU_DEVICE)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    labels = batch["labels"].tolist()
    assert labels[0][0] == IGNORE and labels[0][4] == IGNORE  # no loss from a's last token onto b's first
    assert labels[0][1:4] == a["labels"][1:] and labels[0][5:] == b["labels"][1:]
    assert labels[1][3:] == [IGNORE] * 4  # the padding is a sequence of its own, without loss
    assert "attention_mask" not in batch
    assert label_tokens([a, b]) == sum(t != IGNORE for t in labels[0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_examples_own_forward_pass(tiny_model, attn):
    model = load_model(tiny_model, attn)
    rows = [examples([37, 1, 20, 64], model.config.vocab_size), examples([50, 9], model.config.vocab_size, seed=1)]
    batch = collate_packed(rows, CPU_DEVICE)
    packed = row_logits(model, batch, attention_mask=None, use_cache=False)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            diff = (packed[r, at : at + n] - own_logits(model, e)).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{attn}: row {r} example at {at} differs by {diff}"
            at += n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_all_ones_mask_or_a_cache_lets_packed_examples_attend_to_each_other(tiny_model, attn):
    """The equality above holds only on transformers' position_ids path; these calls leave it
    and must differ by far more than the tolerance, or the test above could not catch them."""
    model = load_model(tiny_model, attn)
    a, b = examples([30, 30], model.config.vocab_size)
    batch = collate_packed([[a, b]], CPU_DEVICE)
    alone = own_logits(model, b)
    ones = row_logits(model, batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False)
    cached = row_logits(model, batch, attention_mask=None, use_cache=True)
    default = row_logits(model, batch, attention_mask=None)  # the config's use_cache
    for leaked in (ones, cached, default):
        assert (leaked[0, 30:] - alone).abs().max().item() > 1000 * LOGITS_ATOL


def test_the_recipe_calls_the_model_without_mask_or_cache(tiny_model):
    model = load_model(tiny_model, "sdpa")
    calls = []

    def spy(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "input_ids"})
        return model(**kwargs)

    batch = packed_micro_batches(examples([10, 12, 5], model.config.vocab_size), 2, 64, CPU_DEVICE)[0]
    summed_loss(spy, batch, torch.float32)
    assert calls[0]["attention_mask"] is None and calls[0]["use_cache"] is False
    assert torch.equal(calls[0]["position_ids"], batch["position_ids"])


def test_packed_loss_equals_padded_loss_for_the_same_step(tiny_model):
    model = load_model(tiny_model, "sdpa").eval()  # no dropout: the two must compute the same function
    step = examples([90, 12, 45, 3, 60, 77, 20, 33], model.config.vocab_size, seed=2)
    with torch.no_grad():
        padded = sum(summed_loss(model, collate(step[i : i + 4], CPU_DEVICE), torch.float32).item() for i in (0, 4))
        batches = packed_micro_batches(step, 4, 96, CPU_DEVICE)
        packed = sum(summed_loss(model, b, torch.float32).item() for b in batches)
    assert len(batches) == 1  # 340 tokens in 4 rows of 96: one forward pass instead of two
    assert packed == pytest.approx(padded, rel=LOSS_RTOL)
    by_rows = eval_loss(model, step, 4, CPU_DEVICE, torch.float32)
    by_packing = eval_loss(model, step, 4, CPU_DEVICE, torch.float32, batching="padding_free", max_seq_len=96)
    assert by_packing[1] == by_rows[1] == label_tokens(step)
    assert by_packing[0] == pytest.approx(by_rows[0], rel=LOSS_RTOL)


@pytest.fixture
def planned(tiny_model, datasets, tmp_path):
    return plan_and_rows("run_packed", tiny_model, datasets["instruction"], tmp_path / "store")


def with_batching(plan, batching: str, **update):
    return plan.model_copy(update={"hyperparameters": plan.hp.model_copy(update={"batching": batching, **update})})


@pytest.mark.parametrize("batching", ["padding_free", "padded"])
def test_a_chunk_resumed_from_its_checkpoint_continues_bit_for_bit(planned, tmp_path, batching):
    plan, rows, evals = planned
    plan = with_batching(plan, batching)
    straight = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 4, tmp_path / "straight", eval_rows=lambda: evals)
    first = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 2, tmp_path / "first", eval_rows=lambda: evals)
    second = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(first.staging_dir, 2, 4, tmp_path / "second", eval_rows=lambda: evals)
    assert first.losses + second.losses == straight.losses
    assert second.eval_loss == straight.eval_loss
    weights = "adapter_model.safetensors"
    assert (second.staging_dir / CHECKPOINT_ADAPTER_DIR / weights).read_bytes() == (
        straight.staging_dir / CHECKPOINT_ADAPTER_DIR / weights
    ).read_bytes()


def test_padding_free_training_follows_the_padded_loss_curve(planned, tmp_path):
    """The same examples per step and the same normalisation: the two batchings' step losses
    agree to float rounding at step 1 and stay close while the adapters train."""
    plan, rows, evals = planned
    # Without LoRA dropout: its masks draw from the RNG by tensor shape, which differs between batchings.
    plan, padded_plan = with_batching(plan, "padding_free", lora_dropout=0.0), with_batching(plan, "padded", lora_dropout=0.0)
    packed = LoraRecipe(plan, rows, CPU_DEVICE).run_chunk(None, 0, 4, tmp_path / "packed", eval_rows=lambda: evals)
    padded = LoraRecipe(padded_plan, rows, CPU_DEVICE).run_chunk(None, 0, 4, tmp_path / "padded", eval_rows=lambda: evals)
    assert packed.losses[0] == pytest.approx(padded.losses[0], rel=1e-4)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-2)
