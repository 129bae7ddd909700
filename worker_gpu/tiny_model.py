"""Tiny random-weight causal LMs with a BPE tokenizer, for tests and the offline demo.

They are saved with save_pretrained and load through exactly the code path a real
Hugging Face model takes; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from activities.demo_data import demo_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOT, EOT = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE (so any text round-trips) with ChatML special tokens and template.

    vocab_size is an upper bound: a small corpus runs out of merges first.
    No bos and no unk: every byte has a token, and Qwen2-style models use no bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOT, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[BOT],
        # Like Llama/Qwen2 tokenizers: no token_type_ids, which these models reject.
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = CHATML
    return fast


def default_texts() -> list[str]:
    """The demo dataset's texts, so the tokenizer covers what the demo trains on."""
    return demo_texts()


def make_tiny_model(
    out_dir: Path,
    texts: Iterable[str] | None = None,
    *,
    arch: str = "llama",
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama or Qwen2 model and its tokenizer to out_dir."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    archs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in archs:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(archs)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    tokenizer = train_tokenizer(texts if texts is not None else default_texts(), vocab_size)
    config_cls, model_cls = archs[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    # Seed right before init so the same arguments give byte-identical weight files.
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    (out_dir / "README.md").write_text(
        f"# Tiny {arch} test model\n\nRandom weights ({params:,} parameters), made by LockN Tune "
        "(`lockn-tune models make-tiny`) for tests and the offline demo. It knows nothing until tuned.\n"
    )
    return out_dir
