"""Preflight: everything that can be known about a run before a GPU is touched.

Resolves the base model and the dataset, validates the config against the model, and
turns the spec into a plan (steps, batch, warmup, a memory estimate). Each problem a user
can fix fails the run at once with a message that says what to change.
"""

from __future__ import annotations

import math
from pathlib import Path

from activities.base_model import count_parameters, resolve_base_model
from activities.dataset_rows import read_dataset, split_sizes
from activities.errors import user_error
from schemas.activities import TrainingPlan
from schemas.run_spec import Method, RunSpec

CAUSAL_LM_SUFFIX = "ForCausalLM"


def resolve_dataset_path(dataset: str, db, store) -> tuple[Path, str]:
    """The local file behind an uploaded dataset id or a path; and a name for messages."""
    if dataset.startswith("ds_"):
        row = db.get_dataset(dataset)
        if row is None:
            raise user_error(f"dataset {dataset!r} was not found; upload it with POST /v1/datasets first")
        path = store.local_path(row.store_key)
        if path is None:
            raise user_error(f"dataset {dataset!r} is not readable from this worker's artifact store")
        return path, row.name
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise user_error(
            f"dataset {dataset!r} is neither an uploaded dataset id (ds_...) nor a file on the worker; "
            "upload it with POST /v1/datasets or `lockn-tune tune`, or give an absolute path"
        )
    return path, path.name


def build_plan(run_id: str, spec: RunSpec, db, store) -> TrainingPlan:
    hp = spec.hyperparameters
    base = resolve_base_model(spec.base_model)
    arch = (base.config.get("architectures") or [""])[0]
    if not arch.endswith(CAUSAL_LM_SUFFIX):
        raise user_error(
            f"base_model {spec.base_model!r} is a {arch or base.config.get('model_type', 'unknown')} model; "
            "kind 'llm' tunes causal language models (…ForCausalLM)"
        )
    num_params, linear = count_parameters(base.path)
    if isinstance(hp.target_modules, list):
        missing = [m for m in hp.target_modules if m not in linear]
        if missing:
            raise user_error(
                f"hyperparameters.target_modules {missing} are not linear layers of this model; "
                f"it has: {', '.join(linear)} (or use 'all-linear')"
            )
    context = base.config.get("max_position_embeddings")
    if context and hp.max_seq_len > context:
        raise user_error(
            f"hyperparameters.max_seq_len {hp.max_seq_len} is longer than the model's context of {context} tokens; "
            f"set max_seq_len to {context} or less"
        )
    if spec.method == Method.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises more than ImportError on broken installs
            raise user_error(f"method 'qlora' needs bitsandbytes, which does not load here ({exc}); use method 'lora'")

    data_path, source = resolve_dataset_path(spec.dataset, db, store)
    _, report = read_dataset(data_path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=source)
    if report.refused:
        raise user_error(report.message, report=report.model_dump(mode="json"))
    n_train, n_eval = split_sizes(report.valid_rows, spec.eval_fraction)
    if n_train < 1 or n_eval < 1:
        raise user_error(
            f"dataset {source} has {report.valid_rows} valid rows: too few to split into train and eval; "
            "add rows (a few dozen at the very least)"
        )

    per_step = hp.micro_batch_size * hp.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = hp.max_steps or max(1, math.ceil(hp.epochs * n_train / per_step))
    warnings = []
    if per_step > n_train:
        warnings.append(
            f"one optimizer step uses {per_step} examples but the train split has {n_train}; "
            "rows repeat within a step: lower micro_batch_size or grad_accum"
        )
    if not report.valid_rows == report.total_rows:
        warnings.append(report.message)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    return TrainingPlan(
        run_id=run_id,
        spec=spec,
        spec_sha256=spec.sha256(),
        base_model_path=str(base.path),
        base_model_id=spec.base_model,
        base_model_revision=base.revision,
        model_type=base.config.get("model_type", "unknown"),
        num_parameters=num_params,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dataset_shape=report.shape.value if report.shape else "unknown",
        valid_rows=report.valid_rows,
        train_rows=n_train,
        eval_rows=n_eval,
        micro_batch_size=hp.micro_batch_size,
        grad_accum=hp.grad_accum,
        max_seq_len=hp.max_seq_len,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(hp.warmup_ratio * total),
        memory_estimate_bytes=estimate_memory(base.config, num_params, spec),
        warnings=warnings,
    )


def estimate_memory(config: dict, num_params: int, spec: RunSpec) -> int:
    """A first-order peak estimate: weights + LoRA training state + activations."""
    hp = spec.hyperparameters
    hidden = config.get("hidden_size", 0)
    layers = config.get("num_hidden_layers", 0)
    weight_bytes = num_params * (0.56 if spec.method == Method.qlora else 4)
    # LoRA A and B on ~7 linear layers per block; weights, grads and two Adam moments in fp32.
    lora_params = layers * 7 * 2 * hidden * hp.lora_r
    lora_bytes = lora_params * 16
    vocab = config.get("vocab_size", 0)
    tokens = hp.micro_batch_size * hp.max_seq_len
    activation_bytes = tokens * (layers * hidden * 34 + vocab * 8)
    return int(weight_bytes + lora_bytes + activation_bytes)
