"""Preflight: everything that can be known about a run before a GPU is touched.

Resolves the base model and the dataset, checks the data row by row, renders samples the
way the model will see them, measures token lengths, chooses every unset hyperparameter
(saying why), and plans micro-batch, accumulation and gradient checkpointing so the run
fits the training worker's memory — or explains what to change. The same report answers
`POST /v1/preflight` (a dry run) and is stored with every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

from activities.base_model import count_parameters, resolve_base_model
from activities.dataset_render import IGNORE, render_example
from activities.dataset_rows import read_dataset, split_sizes
from activities.defaults import EFFECTIVE_BATCH, Choice, resolve_simple_defaults
from activities.errors import user_error
from activities.memory_estimate import ModelShape, estimate_training_memory
from schemas.activities import TrainingPlan
from schemas.preflight import DatasetPreflight, Explanation, MemoryPlan, PreflightReport, RenderedSample, TokenLengths
from schemas.run_spec import Method, ResolvedHyperparameters, RunSpec
from store.artifacts import ArtifactCorrupt

CAUSAL_LM_SUFFIX = "ForCausalLM"
MEASURED_ROWS = 5000  # tokenize at most this many rows for statistics (a seeded sample beyond)
SEQ_CANDIDATES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
MICRO_BATCHES = (16, 8, 4, 2, 1)
TRUNCATION_REFUSED = 0.25  # a user-set max_seq_len that cuts more rows than this is refused
TRUNCATION_WARNED = 0.02
USABLE_GPU = 0.90  # headroom for the CUDA context and fragmentation
USABLE_RAM = 0.80


def resolve_dataset_path(dataset: str, db, store) -> tuple[Path, str]:
    """The local file behind an uploaded dataset id or a path; and a name for messages."""
    if dataset.startswith("ds_"):
        row = db.get_dataset(dataset) if db is not None else None
        if row is None:
            raise user_error(f"dataset {dataset!r} was not found; upload it with POST /v1/datasets first")
        try:
            path = store.local_file(row.store_key)  # a cached download where the store is remote
        except FileNotFoundError:
            raise user_error(
                f"dataset {dataset!r} ({row.name}) is missing from the artifact store at {store.uri(row.store_key)}; "
                "upload it again with POST /v1/datasets"
            ) from None
        except ArtifactCorrupt as exc:
            raise user_error(
                f"dataset {dataset!r} ({row.name}) is corrupt in the artifact store at {exc.where}: stored with "
                f"sha256 {exc.expected}, reads as {exc.actual}; upload it again with POST /v1/datasets"
            ) from None
        return path, row.name
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise user_error(
            f"dataset {dataset!r} is neither an uploaded dataset id (ds_...) nor a file on the worker; "
            "upload it with POST /v1/datasets or `lockn-tune tune`, or give an absolute path"
        )
    return path, path.name


def build_plan(run_id: str, spec: RunSpec, db, store, hardware: dict | None = None) -> TrainingPlan:
    """The plan for a run, or a user error listing what to change."""
    report = preflight_report(run_id, spec, db, store, hardware)
    if not report.ok:
        raise user_error(" ".join(report.errors), report=report.model_dump(mode="json"))
    return report.plan


def preflight_report(run_id: str, spec: RunSpec, db, store, hardware: dict | None = None) -> PreflightReport:
    """The full report. Problems a user can fix are collected as errors, not raised;
    only a missing model or dataset raises (nothing else can be checked without them)."""
    hardware = hardware or {}
    errors, warnings = [], []
    hp = spec.hyperparameters

    base = resolve_base_model(spec.base_model)
    arch = (base.config.get("architectures") or [""])[0]
    if not arch.endswith(CAUSAL_LM_SUFFIX) and arch not in _matrix_llm_architectures():
        errors.append(
            f"base_model {spec.base_model!r} is a {arch or base.config.get('model_type', 'unknown')} model; "
            "kind 'llm' tunes causal language models (…ForCausalLM)"
        )
    num_params, linear = count_parameters(base.path)
    if isinstance(hp.target_modules, list):
        missing = [m for m in hp.target_modules if m not in linear]
        if missing:
            errors.append(
                f"hyperparameters.target_modules {missing} are not linear layers of this model; "
                f"it has: {', '.join(linear)} (or use 'all-linear')"
            )
    context = base.config.get("max_position_embeddings") or SEQ_CANDIDATES[-1]
    if hp.max_seq_len and hp.max_seq_len > context:
        errors.append(
            f"hyperparameters.max_seq_len {hp.max_seq_len} is longer than the model's context of {context} tokens; "
            f"set max_seq_len to {context} or less"
        )
    if hardware.get("nvidia_driver") and hardware.get("device") == "cpu":
        warnings.append(
            f"the training worker has an NVIDIA driver ({hardware['nvidia_driver']}) but torch "
            f"{hardware.get('torch_version')} (CUDA {hardware.get('cuda_version')}) cannot use the GPU: "
            "update the driver or install a torch build for its CUDA version; until then training runs on the CPU"
        )
    elif hardware and hardware.get("device") == "cpu":
        warnings.append("the training worker has no GPU: training runs on the CPU, which is fine for tiny models and slow for real ones")
    if spec.method == Method.qlora and hardware.get("bitsandbytes_usable") is False:
        errors.append("method 'qlora' needs bitsandbytes, which does not load on the training worker; use method 'lora'")

    data_path, source = resolve_dataset_path(spec.dataset, db, store)
    examples, validation = read_dataset(data_path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=source)
    if validation.refused:
        errors.append(validation.message)
    elif validation.bad_rows:
        warnings.append(validation.message)
    n_train, n_eval = split_sizes(validation.valid_rows, spec.eval_fraction)
    if not validation.refused and (n_train < 1 or n_eval < 1):
        errors.append(
            f"dataset {source} has {validation.valid_rows} valid rows: too few to split into train and eval; "
            "add rows (a few dozen at the very least)"
        )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    values, choices = resolve_simple_defaults(spec, n_train, num_params)

    dataset = None
    if examples:
        dataset, max_seq_len, seq_choice = _dataset_preflight(
            examples, validation, tokenizer, hp.max_seq_len, context, spec.hyperparameters.seed, n_train, n_eval
        )
        if seq_choice:
            choices.append(seq_choice)
        if hp.max_seq_len and dataset.truncated_share > TRUNCATION_REFUSED:
            errors.append(_truncation_message(dataset, hp.max_seq_len, refused=True))
        elif dataset.truncated_share > TRUNCATION_WARNED:
            warnings.append(_truncation_message(dataset, max_seq_len, refused=False))
        if dataset.duplicate_rows:
            warnings.append(f"{dataset.duplicate_rows} rows repeat an earlier row exactly; they weigh double in training")
    else:
        max_seq_len = hp.max_seq_len or 1024

    shape = ModelShape.from_config(base.config, num_params)
    device = hardware.get("device", "cpu")
    bf16 = device == "cuda" and bool(hardware.get("bf16_supported"))
    precision = "bfloat16" if bf16 else "float32"
    memory, batch_values, batch_choices, memory_errors = _plan_memory(spec, shape, max_seq_len, hardware, precision, values)
    errors += memory_errors
    choices += batch_choices
    values.update(batch_values)
    disk_error = _disk_check(memory, spec, hardware, data_path)
    if disk_error:
        errors.append(disk_error)

    report = PreflightReport(
        ok=not errors,
        errors=errors,
        warnings=warnings,
        hardware=hardware,
        dataset=dataset,
        memory=memory,
        defaults=[Explanation(field=c.field, value=c.value, why=c.why) for c in choices],
    )
    if errors:
        return report

    resolved = ResolvedHyperparameters(**{**hp.model_dump(), **values, "max_seq_len": max_seq_len})
    per_step = resolved.micro_batch_size * resolved.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = resolved.max_steps or max(1, math.ceil(resolved.epochs * n_train / per_step))
    if per_step > n_train:
        report.warnings.append(
            f"one optimizer step uses {per_step} examples but the train split has {n_train}; "
            "rows repeat within a step: lower micro_batch_size or grad_accum"
        )
    report.estimated_steps = total
    mean_tokens = min(dataset.token_lengths.mean, max_seq_len) if dataset else max_seq_len
    report.estimated_seconds = round(_seconds(num_params, total * per_step * mean_tokens, hardware), 1)
    report.plan = TrainingPlan(
        run_id=run_id,
        spec=spec,
        spec_sha256=spec.sha256(),
        base_model_path=str(base.path),
        base_model_id=spec.base_model,
        base_model_revision=base.revision,
        model_type=base.config.get("model_type", "unknown"),
        num_parameters=num_params,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dataset_shape=validation.shape.value if validation.shape else "unknown",
        valid_rows=validation.valid_rows,
        train_rows=n_train,
        eval_rows=n_eval,
        micro_batch_size=resolved.micro_batch_size,
        grad_accum=resolved.grad_accum,
        max_seq_len=max_seq_len,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(resolved.warmup_ratio * total),
        memory_estimate_bytes=memory.estimate_bytes,
        warnings=report.warnings,
        hyperparameters=resolved,
        precision=precision,
    )
    return report


def _dataset_preflight(examples, validation, tokenizer, max_seq_len, context, seed, n_train, n_eval):
    """Samples, token lengths, truncation and duplicates; and max_seq_len when it is unset."""
    picked = list(range(len(examples)))
    if len(picked) > MEASURED_ROWS:
        picked = sorted(random.Random(seed).sample(picked, MEASURED_ROWS))
    lengths, renders = [], {}
    for i in picked:
        r = render_example(examples[i], tokenizer, context)
        lengths.append(r.length_before_truncation)
        if len(renders) < 3:
            renders[i] = r
    ordered = sorted(lengths)
    choice = None
    if max_seq_len is None:
        covering = ordered[min(len(ordered) - 1, math.ceil(0.98 * len(ordered)) - 1)]
        max_seq_len = next((c for c in SEQ_CANDIDATES if c >= covering and c <= context), context)
        choice = Choice(
            "max_seq_len", max_seq_len,
            f"the shortest of {', '.join(map(str, SEQ_CANDIDATES[:4]))}, ... that holds 98% of rows whole "
            f"(98th percentile: {covering} tokens; the model's context: {context})",
        )
    truncated = sum(1 for n in lengths if n > max_seq_len)
    seen, duplicates = set(), 0
    for e in examples:
        key = hashlib.sha256(json.dumps([e.messages, e.prompt, e.completion], sort_keys=True).encode()).digest()
        duplicates += key in seen
        seen.add(key)
    edges = _histogram_edges(ordered[-1])
    counts = [sum(1 for n in lengths if lo <= n < hi) for lo, hi in zip(edges, edges[1:])]
    samples = [
        RenderedSample(
            line=examples[i].line,
            text=tokenizer.decode(r.input_ids[:max_seq_len]),
            trained_text=tokenizer.decode([t for t in r.labels[:max_seq_len] if t != IGNORE]),
        )
        for i, r in renders.items()
    ]
    stats = TokenLengths(
        min=ordered[0], p50=ordered[len(ordered) // 2], p95=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        max=ordered[-1], mean=round(sum(ordered) / len(ordered), 1), histogram_edges=edges, histogram_counts=counts,
    )
    dataset = DatasetPreflight(
        validation=validation, samples=samples, token_lengths=stats, measured_rows=len(lengths),
        truncated_rows=truncated, truncated_share=round(truncated / len(lengths), 4), duplicate_rows=duplicates,
        train_rows=n_train, eval_rows=n_eval,
    )
    return dataset, max_seq_len, choice


def _histogram_edges(longest: int) -> list[int]:
    edges, edge = [0], 32
    while edges[-1] <= longest:
        edges.append(edge)
        edge *= 2
    return edges


def _truncation_message(dataset: DatasetPreflight, max_seq_len: int, refused: bool) -> str:
    share = dataset.truncated_share
    lengths = dataset.token_lengths
    fix = next((c for c in SEQ_CANDIDATES if c >= lengths.p95), None)
    text = f"max_seq_len {max_seq_len} truncates {share:.0%} of rows ({dataset.truncated_rows} of {dataset.measured_rows})"
    hint = f"; raise it to {fix} (holds 95% of rows whole)" if fix and fix > max_seq_len else "; shorten the longest rows"
    return text + (hint + " or shorten the rows" if refused else hint)


def _available(hardware: dict) -> tuple[str, int]:
    if hardware.get("device") == "cuda" and hardware.get("gpu_memory_bytes"):
        return "cuda", int(hardware["gpu_memory_bytes"] * USABLE_GPU)
    return "cpu", int((hardware.get("memory_available_bytes") or 16 * 2**30) * USABLE_RAM)


def _plan_memory(spec: RunSpec, shape, max_seq_len: int, hardware: dict, precision: str, values: dict):
    """Micro-batch, accumulation and checkpointing that fit; or errors that say what would."""
    hp = spec.hyperparameters
    device, available = _available(hardware)
    rank = values.get("lora_r", hp.lora_r)
    effective = (hp.micro_batch_size * hp.grad_accum) if hp.micro_batch_size and hp.grad_accum else EFFECTIVE_BATCH[spec.preset]
    micro = [hp.micro_batch_size] if hp.micro_batch_size else [m for m in MICRO_BATCHES if m <= effective]
    checkpointing = [hp.gradient_checkpointing] if hp.gradient_checkpointing is not None else [False, True]

    def estimate(method, mbs, gc, seq=max_seq_len):
        return estimate_training_memory(
            shape, method=method, lora_r=rank, target_modules=hp.target_modules, seq_len=seq,
            micro_batch=mbs, gradient_checkpointing=gc, dtype=precision, device=device, lora_dropout=hp.lora_dropout,
        )

    for gc in checkpointing:
        for mbs in micro:
            est = estimate(spec.method.value, mbs, gc)
            if est.total <= available:
                accum = hp.grad_accum or max(1, math.ceil(effective / mbs))
                choices = []
                if hp.micro_batch_size is None:
                    choices.append(Choice("micro_batch_size", mbs, f"the largest that fits in {_gb(available)} on {device}"))
                if hp.grad_accum is None:
                    choices.append(Choice("grad_accum", accum, f"{mbs} x {accum} reaches the preset's batch of {effective} examples per step"))
                if hp.gradient_checkpointing is None:
                    why = "needed to fit: activations are recomputed in backward" if gc else "not needed: it would only slow training"
                    choices.append(Choice("gradient_checkpointing", gc, why))
                memory = MemoryPlan(
                    device=device, estimate_bytes=est.total, available_bytes=available, fits=True,
                    adapter_bytes=est.lora_weights, lines=est.lines(),
                )
                return memory, {"micro_batch_size": mbs, "grad_accum": accum, "gradient_checkpointing": gc}, choices, []

    smallest = estimate(spec.method.value, micro[-1], checkpointing[-1])
    memory = MemoryPlan(
        device=device, estimate_bytes=smallest.total, available_bytes=available, fits=False,
        adapter_bytes=smallest.lora_weights, lines=smallest.lines(),
    )
    message = (
        f"the run needs {_gb(smallest.total)} even at micro-batch {micro[-1]}"
        f"{' with gradient checkpointing' if checkpointing[-1] else ''}; the worker has {_gb(available)} usable on {device}."
    )
    fixes = []
    if spec.method == Method.lora:
        q = estimate("qlora", micro[-1], checkpointing[-1])
        if q.total <= available:
            fixes.append(f"use method 'qlora' (needs {_gb(q.total)})")
    for seq in sorted((c for c in SEQ_CANDIDATES if c < max_seq_len), reverse=True):
        if estimate(spec.method.value, micro[-1], checkpointing[-1], seq).total <= available:
            fixes.append(f"lower max_seq_len to {seq}")
            break
    fixes.append("pick a smaller base model or a worker with more memory")
    return memory, {}, [], [message + " To fit: " + "; or ".join(fixes) + "."]


def _matrix_llm_architectures() -> set[str]:
    """Architectures the model matrix supports for LLM tuning (Gemma 3 4B+ is a ...ForConditionalGeneration)."""
    from schemas.model_matrix import load_matrix

    return {m.architecture for m in load_matrix().models if m.kind == "llm"}


def _disk_check(memory: MemoryPlan | None, spec: RunSpec, hardware: dict, data_path: Path) -> str | None:
    """Checkpoints (adapter + two Adam moments, kept keep_checkpoints + 1 at a time) and the data snapshot must fit."""
    free = hardware.get("disk_free_bytes")
    if not free or memory is None:
        return None
    need = 3 * memory.adapter_bytes * (spec.keep_checkpoints + 2) + 3 * data_path.stat().st_size
    if need > free:
        return f"checkpoints and the data snapshot need about {_gb(need)} of disk; the worker's home has {_gb(free)} free"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _seconds(num_params: int, tokens: float, hardware: dict) -> float:
    """Rough: 6 x params x tokens FLOPs at a typical utilisation of the device's peak."""
    if hardware.get("device") == "cuda":
        flops = 300e12 if hardware.get("bf16_supported") else 30e12
        utilisation = 0.35
    else:
        flops = (hardware.get("cpu_count") or 2) * 30e9
        utilisation = 0.3
    return 6 * num_params * tokens / (flops * utilisation)
