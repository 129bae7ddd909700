"""Loading a base model (full precision or 4-bit NF4) and its LoRA adapter.

One code path for a tiny local test model and a real Hugging Face model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from schemas.activities import TrainingPlan
from schemas.hardware import training_precision
from schemas.run_spec import Method


def pick_device() -> torch.device:
    """The GPU this worker is pinned to (CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


class PrecisionUnavailable(RuntimeError):
    """The plan's compute dtype is one this worker cannot train in (retried elsewhere)."""


def plan_dtype(plan: TrainingPlan, device: torch.device) -> torch.dtype:
    """The compute dtype the plan was made for. A worker that cannot honour it refuses
    rather than train in another dtype than the plan's memory estimate and lineage say."""
    here = training_precision(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    if plan.precision != here:
        raise PrecisionUnavailable(
            f"the run's plan trains in {plan.precision}, but this worker ({device}) trains in {here}: "
            "it is retried on another GPU worker; if none can, start the run again so preflight "
            "plans for the workers you have"
        )
    return torch.bfloat16 if plan.precision == "bfloat16" else torch.float32


def base_model_key(plan: TrainingPlan, device: torch.device) -> tuple:
    """Everything load_base_model reads: two plans with the same key load the same model
    (the worker's BaseModelCache keeps one). A new input of load_base_model belongs here."""
    return (
        plan.base_model_path, plan.base_model_revision, plan.spec.method.value, plan.precision,
        plan.hp.gradient_checkpointing, str(device),
    )


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str | None:
    """flash_attention_2 on a CUDA GPU in a 16-bit dtype when the flash-attn package is
    installed: its varlen kernels take padding-free rows by their position_ids (cu_seqlens),
    so a packed row costs its examples' tokens, not its width squared. Otherwise None:
    transformers' default (SDPA where the architecture has it), which on padding-free rows
    gets the block-diagonal mask (worker_gpu/packing.py)."""
    if device.type == "cuda" and dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_base_model(plan: TrainingPlan, device: torch.device):
    """The base model as the plan says: NF4 4-bit for QLoRA, compute dtype otherwise."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = plan_dtype(plan, device)
    kwargs = dict(
        dtype=dtype, device_map={"": device.index if device.type == "cuda" else "cpu"},
        attn_implementation=attention_implementation(device, dtype),
    )
    if plan.spec.method == Method.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Keep the (tiny-model) output head in full precision, as PEFT's QLoRA recipe does.
            llm_int8_skip_modules=["lm_head"],
        )
    model = AutoModelForCausalLM.from_pretrained(plan.base_model_path, local_files_only=True, **kwargs)
    checkpointing = plan.hp.gradient_checkpointing
    if plan.spec.method == Method.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        # Recompute activations in backward; inputs must carry grad for the frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def lora_config(plan: TrainingPlan):
    from peft import LoraConfig

    hp = plan.hp
    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model, plan: TrainingPlan, adapter_dir: Path | None, trainable: bool):
    """A fresh LoRA adapter (seeded) or the one saved in adapter_dir."""
    from peft import PeftModel, get_peft_model

    if adapter_dir is None:
        torch.manual_seed(plan.hp.seed)
        return get_peft_model(model, lora_config(plan))
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
