"""Batched greedy generation gives each prompt's own output, and says which outputs stopped.

Run: python -m pytest tests/worker_gpu/test_generation.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from activities.demo_data import demo_texts
from activities.eval_metrics import score_outputs
from worker_gpu.generation import generate_outputs, stop_token_ids
from worker_gpu.samples import generate_sample

CPU = torch.device("cpu")
MAX_SEQ_LEN, MAX_NEW_TOKENS = 48, 12  # token_budget: 36 prompt tokens, 12 new
# Prompts of many lengths, one far over the prompt budget (cut to its tail), one empty.
PROMPTS = [*demo_texts()[:6], "Add 3 and 4.", " ".join(demo_texts()[:20]), "", "red"]


@pytest.fixture
def model(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model)


@pytest.fixture
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def generate(model, tokenizer, batch_size: int, prompts=PROMPTS, **kwargs):
    return generate_outputs(model, tokenizer, prompts, CPU, MAX_SEQ_LEN, MAX_NEW_TOKENS, batch_size, **kwargs)


def bias_stop_tokens(model, tokenizer, bias: float) -> None:
    """Give lm_head a bias that is `bias` on every stop token and 0 elsewhere: -1e4 and a stop
    token is never chosen, +1e4 and one is chosen first."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[stop_token_ids(model, tokenizer)] = bias
    model.lm_head = head


def test_a_batch_gives_each_prompt_its_own_greedy_output(model, tokenizer):
    # Add a token the model emits early for one prompt as a second stop token, so the batch
    # mixes outputs that stop early with ones that run to the bound.
    first = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = model.generate(input_ids=first, attention_mask=torch.ones_like(first), max_new_tokens=4, do_sample=False)
    early = answer[0, first.shape[1] + 3].item()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, early]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, early]

    alone = generate(model, tokenizer, batch_size=1)
    batched = generate(model, tokenizer, batch_size=4)
    whole = generate(model, tokenizer, batch_size=len(PROMPTS))
    assert batched == alone and whole == alone
    assert alone[0].stopped and alone[0].new_tokens <= 3
    assert any(o.stopped for o in alone) and not all(o.stopped for o in alone)
    assert all(o.new_tokens == MAX_NEW_TOKENS for o in alone if not o.stopped)
    # The same answers as the report's one-prompt samples (which keep a stop token that is not
    # a special token, so only the outputs that ran to the bound compare).
    for prompt, output in zip(PROMPTS, alone):
        if prompt and not output.stopped:
            assert generate_sample(model, tokenizer, prompt, CPU, MAX_SEQ_LEN, MAX_NEW_TOKENS)[1] == output.text


def test_a_model_that_never_emits_eos_has_stop_rate_zero(model, tokenizer):
    bias_stop_tokens(model, tokenizer, -1e4)
    outputs = generate(model, tokenizer, batch_size=4)
    assert [o.new_tokens for o in outputs] == [MAX_NEW_TOKENS] * len(PROMPTS)
    assert not any(o.stopped for o in outputs)
    assert score_outputs(outputs, [""] * len(PROMPTS)).summary.stop_rate == 0.0


def test_a_model_that_emits_eos_at_once_has_stop_rate_one(model, tokenizer):
    bias_stop_tokens(model, tokenizer, 1e4)
    outputs = generate(model, tokenizer, batch_size=4)
    assert [(o.text, o.new_tokens, o.stopped) for o in outputs] == [("", 0, True)] * len(PROMPTS)
    assert score_outputs(outputs, [""] * len(PROMPTS)).summary.stop_rate == 1.0


def test_between_batches_runs_before_each_batch_and_raising_stops(model, tokenizer):
    prompts, calls = PROMPTS[:5], []
    generate(model, tokenizer, batch_size=2, prompts=prompts, between_batches=lambda: calls.append(1))
    assert len(calls) == 3  # 5 prompts in batches of 2

    class Cancelled(Exception):
        pass

    def cancel_second():
        calls.append(1)
        if len(calls) > 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate(model, tokenizer, batch_size=2, prompts=prompts, between_batches=cancel_second)
    assert len(calls) == 5  # one batch generated, the second refused
