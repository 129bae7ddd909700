"""Sample generations for eval reports, bounded by the plan: the prompt is cut to its last
tokens so that prompt plus answer fit max_seq_len, and the answer to max_new_tokens.

Keeping the end of an over-long prompt keeps the part the answer follows (the question,
the chat template's assistant header); the start is what truncation drops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

# Texts in an eval report are for reading: a few thousand characters of each is plenty, and
# it keeps the activity's result far under Temporal's 2 MB payload limit.
SAMPLE_TEXT_CHARS = 2000
# A token rarely spans more characters than this; prompt_tail widens its window when one does.
CHARS_PER_TOKEN = 8


@dataclass
class PromptTail:
    ids: list[int]
    truncated: bool


def token_budget(max_seq_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens, new tokens): the answer gets at most half of max_seq_len, the prompt the rest."""
    new = max(1, min(max_new_tokens, max_seq_len // 2))
    return max_seq_len - new, new


def prompt_tail(tokenizer, text: str, budget: int) -> PromptTail:
    """The last `budget` tokens of text. Only the end of the text is tokenized (a window that
    grows until it holds more than budget tokens), so a megabyte prompt costs what a short one does."""
    window = budget * CHARS_PER_TOKEN
    while True:
        whole = window >= len(text)
        piece = text if whole else text[-window:]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        # A cut window's first token may be half a word; taking fewer tokens than it holds drops it.
        if whole or len(ids) > budget:
            return PromptTail(ids=ids[-budget:], truncated=not whole or len(ids) > budget)
        window *= 4


class _EveryToken(StoppingCriteria):
    """Calls `between` before each new token; it raises to stop generation (cancel, shutdown)."""

    def __init__(self, between: Callable[[], None]):
        self.between = between

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.between()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_sample(
    model, tokenizer, prompt: str, device: torch.device, max_seq_len: int, max_new_tokens: int,
    between_tokens: Callable[[], None] = lambda: None,
) -> tuple[str, str]:
    """Greedy answer to prompt within the plan's bounds: (the prompt as the model saw it, the answer)."""
    budget, new = token_budget(max_seq_len, max_new_tokens)
    tail = prompt_tail(tokenizer, prompt, budget)
    between_tokens()
    input_ids = torch.tensor([tail.ids], dtype=torch.long, device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new,
        do_sample=False,
        use_cache=True,  # training turns the cache off; generation wants it
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([_EveryToken(between_tokens)]),
    )
    answer = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    if not tail.truncated:
        return clip_start(prompt), answer
    # What the model saw of a cut prompt: its last tokens, marked as a cut.
    return "…" + tokenizer.decode(tail.ids, skip_special_tokens=False)[-SAMPLE_TEXT_CHARS:], answer


def clip_start(text: str, limit: int = SAMPLE_TEXT_CHARS) -> str:
    """text, or its first `limit` characters and an ellipsis."""
    return text if len(text) <= limit else text[:limit] + "…"
