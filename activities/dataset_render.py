"""Rendering rows into tokens with a loss mask: the model learns only the answers.

Chat and instruction rows go through the model's chat template when it has one; the
assistant spans are found by rendering each prefix, so any prefix-stable template works.
"""

from __future__ import annotations

from dataclasses import dataclass

from activities.dataset_rows import Example
from schemas.datasets import DatasetShape

IGNORE = -100


@dataclass
class RenderedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length_before_truncation: int


def _fallback_turn(role: str, content: str) -> str:
    return f"### {role.capitalize()}:\n{content}"


def _text_and_spans(example: Example, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that carry loss."""
    eos = tokenizer.eos_token or ""
    if example.shape == DatasetShape.completion:
        text = example.prompt + example.completion + eos
        return text, [(len(example.prompt), len(text))]
    messages = list(example.messages)
    spans = []
    if getattr(tokenizer, "chat_template", None):
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
        return tokenizer.apply_chat_template(messages, tokenize=False), spans
    text = ""
    for m in messages:
        if m["role"] == "assistant":
            text += "### Assistant:\n"
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            text += "\n\n"
        else:
            text += _fallback_turn(m["role"], m["content"]) + "\n\n"
    return text, spans


def render_example(example: Example, tokenizer, max_seq_len: int) -> RenderedExample:
    """Token ids and labels (IGNORE outside answers), truncated to max_seq_len from the end."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer (tokenizer.json) is needed to align answers with tokens")
    text, spans = _text_and_spans(example, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE
        for tok, (start, _) in zip(ids, enc["offset_mapping"])
    ]
    bos = tokenizer.bos_token
    if bos and not text.startswith(bos) and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    length = len(ids)
    return RenderedExample(
        input_ids=ids[:max_seq_len], labels=labels[:max_seq_len], truncated=length > max_seq_len, length_before_truncation=length
    )


def prompt_and_reference(example: Example, tokenizer) -> tuple[str, str]:
    """What to prompt the model with for a sample generation, and the reference answer."""
    if example.shape == DatasetShape.completion:
        return example.prompt, example.completion
    messages = list(example.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, reference = messages[:last], messages[last]["content"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True), reference
    prompt = "".join(_fallback_turn(m["role"], m["content"]) + "\n\n" for m in context) + "### Assistant:\n"
    return prompt, reference
