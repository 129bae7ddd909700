"""Tiny local models load like real Hugging Face models, offline and reproducibly.

Run: python -m pytest tests/worker_gpu/test_tiny_model.py -q
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker_gpu.tiny_model import default_texts, make_tiny_model, train_tokenizer

TEXTS = ["Translate the color to French.", "red", "rouge", "Add 3 and 4.", "7"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saved_model_loads_offline_and_runs(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert not model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "LockN Tune" in (tiny_model / "README.md").read_text()

    batch = tokenizer(["Add 3 and 4.", "What is the capital of France?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))

    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 5


def test_tokenizer_round_trips_and_has_chatml(tiny_model: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Hello  world, café 🙂!\n\tWrite the animal in uppercase. cat -> CAT"
    enc = tokenizer(text, return_offsets_mapping=True)
    assert tokenizer.decode(enc["input_ids"]) == text
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    # Offsets tile the text, so span masking by character position works. A multi-byte
    # character becomes several byte tokens that all point at that one character.
    spans = [s for i, s in enumerate(enc["offset_mapping"]) if i == 0 or s != enc["offset_mapping"][i - 1]]
    assert "".join(text[a:b] for a, b in spans) == text

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 3 and 4."},
        {"role": "assistant", "content": "7"},
    ]
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 3 and 4.<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == chatml
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nAdd 3 and 4.<|im_end|>\n<|im_start|>assistant\n")
    # Special tokens are single ids, never split into bytes.
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system\nBe brief.\nuser\nAdd 3 and 4.\nassistant\n7\n"


def test_train_tokenizer_respects_vocab_size():
    tokenizer = train_tokenizer(default_texts(), vocab_size=300)
    assert len(tokenizer) <= 300
    assert tokenizer.decode(tokenizer("rouge, bleu!")["input_ids"]) == "rouge, bleu!"


def test_same_seed_same_bytes_different_seed_different_weights(tmp_path: Path):
    a = make_tiny_model(tmp_path / "a", TEXTS, seed=0)
    b = make_tiny_model(tmp_path / "b", TEXTS, seed=0)
    c = make_tiny_model(tmp_path / "c", TEXTS, seed=1)
    assert sha256(a / "model.safetensors") == sha256(b / "model.safetensors")
    assert sha256(a / "tokenizer.json") == sha256(b / "tokenizer.json")
    assert sha256(a / "model.safetensors") != sha256(c / "model.safetensors")


def test_qwen2_arch(tmp_path: Path):
    path = make_tiny_model(tmp_path / "q", TEXTS, arch="qwen2", hidden_size=32, num_heads=4, num_kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert model.config.num_key_value_heads == 1
    ids = tokenizer("red", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "unknown arch"),
        ({"hidden_size": 60, "num_heads": 8}, "hidden_size 60 is not divisible by num_heads 8"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_heads 4 is not divisible by num_kv_heads 3"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        make_tiny_model(tmp_path / "bad", TEXTS, **kwargs)
    assert not (tmp_path / "bad").exists()
