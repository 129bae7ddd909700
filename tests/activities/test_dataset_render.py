"""Rendering rows to tokens: loss only on answers, with and without a chat template.

    python -m pytest tests/activities/test_dataset_render.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from activities.dataset_render import IGNORE, prompt_and_reference, render_example
from activities.dataset_rows import Example
from schemas.datasets import DatasetShape

from worker_gpu.tiny_model import BOT, CHATML, EOT, PAD  # the ChatML template real Qwen models use

CORPUS = [
    "You are a helpful assistant.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke. Why did the chicken cross the road?",
    "Add two and three. The answer is five.",
    "The sky is blue and the grass is green.",
]

CHAT = Example(
    line=1,
    shape=DatasetShape.chat,
    messages=(
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ),
)
COMPLETION = Example(line=1, shape=DatasetShape.completion, prompt="The sky is", completion=" blue and green.")


def _tokenizer(chat_template: str | None, bos: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD, BOT, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, pad_token=PAD, bos_token=bos, additional_special_tokens=[BOT]
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def chatml():
    return _tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain():
    """No chat template, but a bos token (like base models), so the fallback format is used."""
    return _tokenizer(None, bos=PAD)


def learned(tokenizer, rendered) -> str:
    """The text of the tokens that carry loss."""
    return tokenizer.decode([t for t, lab in zip(rendered.input_ids, rendered.labels) if lab != IGNORE])


def unlearned(tokenizer, rendered) -> str:
    return tokenizer.decode([t for t, lab in zip(rendered.input_ids, rendered.labels) if lab == IGNORE])


def test_chat_template_loss_only_on_assistant_turns(chatml):
    r = render_example(CHAT, chatml, max_seq_len=1024)
    assert not r.truncated and r.length_before_truncation == len(r.input_ids) == len(r.labels)
    assert chatml.decode(r.input_ids) == chatml.apply_chat_template(list(CHAT.messages), tokenize=False)
    assert learned(chatml, r) == "The capital of France is Paris.<|im_end|>Why did the chicken cross the road?<|im_end|>"
    assert all(lab in (IGNORE, tok) for tok, lab in zip(r.input_ids, r.labels))
    context = unlearned(chatml, r)
    for text in ("You are a helpful assistant.", "What is the capital of France?", "Tell me a joke.", "<|im_start|>assistant\n"):
        assert text in context
    assert "Paris" not in context and "chicken" not in context


def test_instruction_rows_render_like_chat(chatml):
    example = Example(
        line=1,
        shape=DatasetShape.instruction,
        messages=({"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "The answer is five."}),
    )
    r = render_example(example, chatml, max_seq_len=1024)
    assert learned(chatml, r) == "The answer is five.<|im_end|>"


def test_truncation_keeps_the_start(chatml):
    full = render_example(CHAT, chatml, max_seq_len=1024)
    r = render_example(CHAT, chatml, max_seq_len=10)
    assert r.truncated and r.length_before_truncation == len(full.input_ids) > 10
    assert r.input_ids == full.input_ids[:10] and r.labels == full.labels[:10]
    assert all(lab == IGNORE for lab in r.labels)  # only the system prompt fits


def test_fallback_format_without_chat_template(plain):
    r = render_example(CHAT, plain, max_seq_len=1024)
    assert r.input_ids[0] == plain.bos_token_id and r.labels[0] == IGNORE
    assert plain.decode(r.input_ids[1:]) == (
        "### System:\nYou are a helpful assistant.\n\n"
        "### User:\nWhat is the capital of France?\n\n"
        "### Assistant:\nThe capital of France is Paris.<|im_end|>\n\n"
        "### User:\nTell me a joke.\n\n"
        "### Assistant:\nWhy did the chicken cross the road?<|im_end|>\n\n"
    )
    assert learned(plain, r) == "The capital of France is Paris.<|im_end|>Why did the chicken cross the road?<|im_end|>"


def test_completion_rows(chatml, plain):
    for tokenizer in (chatml, plain):
        r = render_example(COMPLETION, tokenizer, max_seq_len=1024)
        assert learned(tokenizer, r) == " blue and green.<|im_end|>"
        assert tokenizer.decode(r.input_ids, skip_special_tokens=True) == "The sky is blue and green."
    assert render_example(COMPLETION, plain, max_seq_len=1024).input_ids[0] == plain.bos_token_id


def test_prompt_and_reference(chatml, plain):
    prompt, reference = prompt_and_reference(CHAT, chatml)
    assert reference == "Why did the chicken cross the road?"
    assert prompt == chatml.apply_chat_template(list(CHAT.messages[:4]), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Tell me a joke.<|im_end|>\n<|im_start|>assistant\n")
    prompt, _ = prompt_and_reference(CHAT, plain)
    assert prompt.startswith("### System:\n") and prompt.endswith("### User:\nTell me a joke.\n\n### Assistant:\n")
    assert prompt_and_reference(COMPLETION, chatml) == ("The sky is", " blue and green.")


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        render_example(COMPLETION, Slow(), max_seq_len=8)


def test_module_imports_no_torch():
    code = "import sys, activities.dataset_render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_template_that_rewrites_history_falls_back_to_the_answer_text():
    # Like Qwen3: the latest assistant turn gets an (empty) reasoning block, earlier ones do not,
    # so rendering a prefix is not a prefix of the whole conversation.
    template = CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "('<think></think>' if loop.last and message['role'] == 'assistant' else '') + message['content'] + '<|im_end|>'",
    )
    tokenizer = _tokenizer(template)
    r = render_example(CHAT, tokenizer, max_seq_len=1024)
    assert learned(tokenizer, r) == (
        "The capital of France is Paris.<|im_end|><think></think>Why did the chicken cross the road?<|im_end|>"
    )


def test_template_that_drops_an_answer_gives_it_no_loss():
    # Renders only the last message: the first answer is nowhere in the text, so it cannot carry loss.
    tokenizer = _tokenizer("{{ messages[-1]['content'] }}{% if add_generation_prompt %}A:{% endif %}")
    r = render_example(CHAT, tokenizer, max_seq_len=64)
    assert learned(tokenizer, r) == "Why did the chicken cross the road?"


def test_a_very_long_row_is_tokenized_only_as_far_as_truncation_needs(chatml):
    words = " ".join(["sky", "blue", "green", "grass", "joke", "road"][i % 6] for i in range(60_000))
    huge = Example(line=7, shape=DatasetShape.completion, prompt=words, completion=" blue and green.")
    r = render_example(huge, chatml, max_seq_len=256)
    whole = chatml(words + " blue and green." + EOT, add_special_tokens=False)["input_ids"]
    assert r.truncated and r.input_ids == whole[:256]
    assert not r.length_exact and abs(r.length_before_truncation - len(whole)) < 0.05 * len(whole)
    assert r.answer_kept_share == 0  # the answer is far past the cut: nothing of it is learned


def test_answer_kept_share_says_how_much_of_the_answer_survives(chatml):
    row = Example(line=1, shape=DatasetShape.completion, prompt="The sky is", completion=" blue and green." * 4)
    full = render_example(row, chatml, max_seq_len=1024)
    answer = sum(1 for t in full.labels if t != IGNORE)
    prompt = len(full.labels) - answer
    r = render_example(row, chatml, max_seq_len=prompt + answer // 2)
    assert r.truncated and r.length_exact and r.length_before_truncation == len(full.input_ids)
    assert r.answer_kept_share == (answer // 2) / answer
    assert render_example(row, chatml, max_seq_len=1024).answer_kept_share == 1.0


def test_rendered_text_keys_name_copies_and_shared_prompts(chatml):
    from activities.dataset_render import render_text

    a = render_text(COMPLETION, chatml)
    same = render_text(Example(line=9, shape=DatasetShape.completion, prompt="The sky is", completion=" blue and green."), chatml)
    other = render_text(Example(line=3, shape=DatasetShape.completion, prompt="The sky is", completion=" grey."), chatml)
    assert a.key == same.key and a.key != other.key
    assert a.prompt_key == other.prompt_key is not None
    assert not a.may_exceed(64) and a.may_exceed(8)
