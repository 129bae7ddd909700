"""Rendering rows into tokens with a loss mask: the model learns only the answers.

Chat and instruction rows go through the model's chat template when it has one; the
assistant spans are found by rendering each prefix of the conversation. Templates that
render history differently from the latest turn (some drop reasoning from earlier turns)
fall back to locating the answer's own text. Without a template a plain "### User:" /
"### Assistant:" format is used. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from activities.dataset_rows import Example
from schemas.datasets import DatasetShape

# The label of a token that carries no loss: torch's cross_entropy ignore_index, which the
# trainer (worker_gpu/recipe_lora.py) passes. Snapshot rows store labels with it.
IGNORE = -100


# Rows longer than this (in characters) are tokenized a growing prefix at a time: what
# survives truncation is decided by the first max_seq_len tokens, never by the far end of a 1 MB row.
PREFIX_CHARS = 4096


@dataclass
class RenderedExample:
    """Token ids and labels of one example; labels are IGNORE (-100) where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    length_before_truncation: int
    length_exact: bool = True  # False: a very long row, whose length is estimated from the part tokenized
    answer_kept_share: float = 1.0  # share of the answer (tokens, or characters when estimated) left after truncation


@dataclass(frozen=True)
class RenderedText:
    """A row rendered the way the model sees it, before tokenization: text and the spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]

    @property
    def key(self) -> bytes:
        """Rows with equal keys are exact duplicates: the model would see the same text."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).digest()

    @property
    def prompt_key(self) -> bytes | None:
        """Key of everything before the last answer (None when that is blank): equal keys, different
        answers make near-duplicates."""
        start = self.spans[-1][0] if self.spans else len(self.text)
        prompt = self.text[:start]
        return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest() if prompt.strip() else None

    def may_exceed(self, max_seq_len: int) -> bool:
        """False when the row surely fits: a token covers at least one byte of text, plus an added bos."""
        return len(self.text.encode("utf-8", "surrogatepass")) + 2 > max_seq_len


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
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if full.startswith(upto) and upto.startswith(head):
                # The end-of-turn marker is learned (so the model stops); the whitespace after it is not.
                start, end = len(head), len(upto.rstrip())
            else:
                # History renders differently from the last turn: find the answer text itself,
                # plus the end-of-turn marker that follows it in this turn's own render.
                start = full.find(m["content"], cursor)
                if start < 0:
                    continue  # the template rewrote this answer: no loss beats loss on the wrong tokens
                end = start + len(m["content"])
                marker = upto[upto.rfind(m["content"]) + len(m["content"]) :].strip()
                if marker and full.startswith(marker, end):
                    end += len(marker)
            spans.append((start, end))
            cursor = end
        return full, spans
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


def render_text(example: Example, tokenizer) -> RenderedText:
    """The row as the model sees it (chat template or plain format), untokenized, with its answer spans."""
    return RenderedText(*_text_and_spans(example, tokenizer))


def render_example(example: Example, tokenizer, max_seq_len: int, rendered: RenderedText | None = None) -> RenderedExample:
    """Token ids and labels for one example, truncated to max_seq_len tokens (the start is kept).

    Loss is taken on assistant answers with their end-of-turn marker (chat, instruction) or on
    the completion and eos (completion); everything else is IGNORE. A token carries loss when
    its first character lies inside an answer, which needs a fast tokenizer's offsets.
    A very long row is tokenized only as far as truncation needs; its length is then an estimate.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; a fast tokenizer (the model's tokenizer.json) is "
            "needed to find which tokens are answers. Add tokenizer.json to the model folder or pick a model that has one"
        )
    text, spans = (rendered.text, rendered.spans) if rendered else _text_and_spans(example, tokenizer)
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and not text.startswith(bos) and tokenizer.bos_token_id is not None
    keep = max_seq_len - adds_bos  # tokens of the text itself that survive
    size = max(PREFIX_CHARS, 16 * max_seq_len)
    while True:
        part = text[:size]
        enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        # A margin past the cut: only the last words of a cut-off prefix may tokenize differently.
        if size >= len(text) or len(enc["input_ids"]) > keep + 64:
            break
        size *= 4
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    exact = len(part) == len(text)
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE for tok, (start, _) in zip(ids, offsets)]
    length = len(ids) if exact else max(len(ids), round(len(ids) * len(text) / len(part)))
    kept_share = 1.0
    if length > keep:
        if exact:
            answer = sum(1 for t in labels if t != IGNORE)
            kept = sum(1 for t in labels[:keep] if t != IGNORE)
        else:
            cut = offsets[keep][0]  # where the first dropped token starts
            answer = sum(b - a for a, b in spans)
            kept = sum(max(0, min(b, cut) - a) for a, b in spans)
        kept_share = kept / answer if answer else 1.0
    if adds_bos:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    length += adds_bos
    return RenderedExample(
        input_ids=ids[:max_seq_len],
        labels=labels[:max_seq_len],
        truncated=length > max_seq_len,
        length_before_truncation=length,
        length_exact=exact,
        answer_kept_share=kept_share,
    )


def prompt_and_reference(example: Example, tokenizer) -> tuple[str, str]:
    """The text to prompt a model with for a sample generation, and the reference answer.

    Chat and instruction rows: every message before the last assistant one, rendered with
    the generation prompt (the chat template, or the plain fallback format); completion rows:
    the prompt as is.
    """
    if example.shape == DatasetShape.completion:
        return example.prompt, example.completion
    messages = list(example.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, reference = messages[:last], messages[last]["content"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True), reference
    prompt = "".join(_fallback_turn(m["role"], m["content"]) + "\n\n" for m in context) + "### Assistant:\n"
    return prompt, reference
