"""Batched greedy generation for generation metrics (activities/eval_metrics.py): each prompt
cut to its last tokens by the plan's budget (worker_gpu/samples.py), batches left-padded with
an attention mask, and for each output whether it stopped on an EOS / end-of-turn token
before max_new_tokens.

Run its tests: python -m pytest tests/worker_gpu/test_generation.py -q

A batch gives the same outputs as generating each prompt alone: padding sits on the left,
masked out, and the model takes its positions from the mask, so every prompt sees what it
would see alone. Prompts are batched in order of length, so little of a batch is padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from activities.eval_metrics import Generated
from worker_gpu.samples import prompt_tail, token_budget


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos token and the model's
    generation_config eos ids (often a list: end-of-text and end-of-turn)."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(token)
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config name no eos token: nothing would stop generation")
    return ids


@torch.no_grad()
def generate_outputs(
    model, tokenizer, prompts: Sequence[str], device: torch.device, max_seq_len: int, max_new_tokens: int,
    batch_size: int, between_batches: Callable[[], None] | None = None,
) -> list[Generated]:
    """Greedy outputs for prompts, in their order, batch_size prompts per generate call, within
    the plan's bounds (token_budget). between_batches() runs before every batch: it raises to
    stop (cancel, shutdown). An empty prompt starts from the tokenizer's bos token, or its eos
    token when it has none (as GPT-2-style models generate from nothing)."""
    budget, new = token_budget(max_seq_len, max_new_tokens)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else stops[0]
    tails = [prompt_tail(tokenizer, p, budget).ids or [start] for p in prompts]
    order = sorted(range(len(tails)), key=lambda i: len(tails[i]))
    outputs: list[Generated | None] = [None] * len(tails)
    model.eval()
    for first in range(0, len(order), batch_size):
        if between_batches is not None:
            between_batches()
        batch = order[first : first + batch_size]
        width = max(len(tails[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(tails[i]) :] = torch.tensor(tails[i], dtype=torch.long)
            attention_mask[row, width - len(tails[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=new,
            do_sample=False,
            use_cache=True,  # training turns the cache off; generation wants it
            pad_token_id=pad,
            eos_token_id=stops,
        )
        for row, i in enumerate(batch):
            outputs[i] = _answer(tokenizer, out[row, width:].tolist(), stops)
    return outputs


def _answer(tokenizer, generated: list[int], stops: list[int]) -> Generated:
    """The answer in generated: its tokens before the first stop token (the rest of a row that
    stopped before its batch did is padding), or all of them when none came within the bound."""
    stop_at = next((k for k, token in enumerate(generated) if token in stops), None)
    tokens = generated if stop_at is None else generated[:stop_at]
    return Generated(
        text=tokenizer.decode(tokens, skip_special_tokens=True), new_tokens=len(tokens), stopped=stop_at is not None
    )
