"""The training memory estimate: its terms move the way the physics says, and a 7B plan
lands where a person sizing a GPU would expect. (Checked against measured peaks by
benchmarks/memory_estimate.py; these tests measure nothing.)"""

from __future__ import annotations

import pytest

from activities.memory_estimate import MemoryEstimate, ModelShape, estimate_training_memory

GB = 1e9

# Llama-3-8B's shape (8.03B parameters).
LLAMA_8B = ModelShape(
    num_parameters=8_030_261_248, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    intermediate_size=14336, vocab_size=128256,
)
# The Llama the benchmark measures.
TINY = ModelShape(
    num_parameters=20_189_696, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
    intermediate_size=1408, vocab_size=8192,
)


def estimate(shape=LLAMA_8B, **overrides) -> MemoryEstimate:
    kwargs = dict(
        method="lora", lora_r=16, target_modules="all-linear", seq_len=2048, micro_batch=1,
        gradient_checkpointing=False, dtype="bfloat16", device="cuda",
    )
    return estimate_training_memory(shape, **{**kwargs, **overrides})


@pytest.mark.parametrize("shape", [LLAMA_8B, TINY])
def test_qlora_base_weights_are_smaller_than_lora(shape):
    lora, qlora = estimate(shape, method="lora"), estimate(shape, method="qlora")
    assert qlora.weights < lora.weights
    assert qlora.quantized_parameters > 0 and lora.quantized_parameters == 0


def test_qlora_weights_are_nf4_blocks_plus_float32_embeddings_and_head():
    qlora = estimate(method="qlora")
    # 4.13 bits per block weight, and 1.05B embedding + head + norm parameters in float32.
    assert 7.5 * GB < qlora.weights < 8.1 * GB


def test_activations_grow_with_seq_len_and_micro_batch():
    short, long = estimate(seq_len=512), estimate(seq_len=2048)
    one, four = estimate(micro_batch=1), estimate(micro_batch=4)
    assert long.activations > 3.5 * short.activations
    assert four.activations > 3.5 * one.activations
    assert long.logits > short.logits and four.logits > one.logits
    assert long.total > short.total and four.total > one.total


def test_gradient_checkpointing_keeps_far_fewer_activations():
    plain, ckpt = estimate(), estimate(gradient_checkpointing=True)
    assert ckpt.activations < plain.activations / 8
    assert ckpt.total < plain.total
    # The weights, adapter and logits do not change.
    assert (ckpt.weights, ckpt.lora_weights, ckpt.logits) == (plain.weights, plain.lora_weights, plain.logits)


def test_bfloat16_roughly_halves_activations():
    """Not exactly half: RMSNorm keeps a float32 copy of its input and dropout masks are
    one byte per element in either dtype."""
    bf16, fp32 = estimate(dtype="bfloat16", micro_batch=2), estimate(dtype="float32", micro_batch=2)
    assert 0.45 < bf16.activations / fp32.activations < 0.65
    assert bf16.weights == fp32.weights / 2


def test_llama_8b_lora_bfloat16_at_2048_tokens_fits_a_plausible_range():
    """28-45 GB without checkpointing. Lower end: 16 GB of bf16 weights, at least 34 bytes
    per token per layer per hidden unit of activations (Korthikanti et al.'s count for a
    GPT block with fused attention: 9.1 GB here), and 3 GB of logits. Upper end: the
    SwiGLU MLP (3.5x hidden) and PEFT's per-module dropout copies of each LoRA input add
    well under as much again. With checkpointing only layer inputs remain: 18-26 GB."""
    plain = estimate()
    assert 28 * GB < plain.total < 45 * GB
    ckpt = estimate(gradient_checkpointing=True)
    assert 18 * GB < ckpt.total < 26 * GB


def test_lora_parameters_match_what_peft_creates():
    # PEFT counts 598,016 trainable parameters for r=16 on all-linear of this model.
    assert estimate(TINY, dtype="float32", device="cpu").lora_parameters == 598_016
    assert estimate(TINY, target_modules=["q_proj", "v_proj"]).lora_parameters == 4 * 16 * ((512 + 512) + (512 + 256))
    assert estimate(TINY, target_modules="all-linear").lora_parameters == estimate(
        TINY, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ).lora_parameters


def test_optimizer_state_is_two_float32_moments_per_lora_parameter():
    e = estimate()
    assert e.lora_weights == e.gradients == 4 * e.lora_parameters
    assert e.optimizer_state == 8 * e.lora_parameters


def test_total_is_the_peak_phase_not_the_sum_of_terms():
    e = estimate()
    terms = e.weights + e.lora_weights + e.gradients + e.optimizer_state + e.activations + e.logits
    # The eval pass runs after the step's activations and gradients are freed.
    assert e.total == e.framework_overhead + terms
    assert e.total < terms + e.eval_pass + e.framework_overhead
    assert e.training_bytes == e.total - e.framework_overhead


def test_lines_explain_every_term():
    text = "\n".join(estimate(method="qlora").lines())
    for words in (
        "base weights", "4-bit NF4", "LoRA weights", "gradients", "optimizer state", "activations",
        "logits", "eval pass", "framework overhead", "predicted peak",
    ):
        assert words in text
    assert "GB" in text and "MB" in text


def test_shape_from_a_config_json():
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "intermediate_size": 14336, "vocab_size": 128256,
    }
    shape = ModelShape.from_config(config, 8_030_261_248)
    assert shape.num_kv_heads == 32  # no num_key_value_heads: plain multi-head attention
    assert shape.head_dim == 128
    assert shape.tie_word_embeddings is False

    qwen = ModelShape.from_config({**config, "num_key_value_heads": 8, "head_dim": 96, "tie_word_embeddings": True}, 1)
    assert (qwen.num_kv_heads, qwen.head_dim, qwen.tie_word_embeddings) == (8, 96, True)
    assert qwen.linear_shapes()["q_proj"] == (4096, 32 * 96)

    nested = ModelShape.from_config({"model_type": "mistral3", "text_config": config}, 1)
    assert nested.hidden_size == 4096


def test_a_config_without_a_needed_key_says_which():
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}, 1)


def test_padding_free_always_masks_attention_and_counts_the_same_tokens():
    """A packed micro-batch of one row still gets the block-diagonal mask (and repeated keys
    and values); at several rows its budget of tokens is the padded batch's slots."""
    one = estimate(TINY, micro_batch=1, seq_len=512, dtype="float32", device="cpu")
    packed_one = estimate(TINY, micro_batch=1, seq_len=512, dtype="float32", device="cpu", batching="padding_free")
    assert packed_one.activations > one.activations and packed_one.logits == one.logits
    four = dict(micro_batch=4, seq_len=512, dtype="float32", device="cpu")
    assert estimate(TINY, **four, batching="padding_free").total == estimate(TINY, **four).total


def test_unknown_method_dtype_or_device_is_refused():
    for bad in (dict(method="full"), dict(dtype="int8"), dict(device="tpu"), dict(batching="packed")):
        with pytest.raises(ValueError):
            estimate(**bad)
