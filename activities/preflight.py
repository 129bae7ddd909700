"""Preflight: everything that can be known about a run before a GPU is touched.

Resolves the base model and the dataset, checks the data row by row, renders samples the
way the model will see them, measures token lengths, chooses every unset hyperparameter
(saying why), and plans micro-batch, accumulation and gradient checkpointing so the run
fits the training worker's memory — or explains what to change. The same report answers
`POST /v1/preflight` (a dry run) and is stored with every run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from activities.base_model import ResolvedBaseModel, count_parameters, load_tokenizer, resolve_base_model
from activities.dataset_render import IGNORE, render_example, render_text
from activities.dataset_rows import count_duplicates, read_dataset, split_rows
from activities.defaults import EFFECTIVE_BATCH, RANK, resolve_simple_defaults
from activities.errors import user_error
from activities.local_paths import PathRefused, allowed_path
from activities.memory_estimate import USABLE_RAM, ModelShape, estimate_training_memory, usable_memory
from schemas.activities import TrainingPlan
from schemas.datasets import TokenLengths
from schemas.hardware import HardwareInfo
from schemas.preflight import (
    DatasetPreflight,
    Explanation,
    LongRow,
    MemoryPlan,
    PreflightReport,
    RenderedSample,
    RepeatedRow,
)
from schemas.run_spec import Method, ResolvedHyperparameters, RunSpec
from store.artifacts import ArtifactCorrupt

CAUSAL_LM_SUFFIX = "ForCausalLM"
MEASURED_ROWS = 5000  # tokenize at most this many rows for statistics (a seeded sample beyond)
SEQ_CANDIDATES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
MICRO_BATCHES = (16, 8, 4, 2, 1)
TRUNCATION_REFUSED = 0.25  # a user-set max_seq_len that cuts more rows than this is refused
MAX_LONG_ROWS = 50  # long rows kept in the report; the count covers all
LISTED_LONG_ROWS = 10  # ... of which the warning names this many
MIN_DISTINCT_SHARE = 0.5  # a dataset with fewer distinct rows than this share is refused as mostly duplicates
MAX_PLANNED_SECONDS = 30 * 86400  # a plan estimated to train longer than this is refused
MAX_PLANNED_STEPS = 10_000_000
# A worker that does not report its free memory (no /proc/meminfo) still gets a plan: one
# for this much RAM, and a warning that says so (GET /v1/models says "unknown" instead).
ASSUMED_MEMORY_BYTES = 16 * 2**30


def resolve_dataset_path(
    dataset: str, db, store, *, roots: Sequence[Path] = (), field: str = "dataset"
) -> tuple[Path, str]:
    """The local file behind an uploaded dataset id or a path under the allowed roots
    (activities/local_paths.py); and a name for messages. A path outside the roots (any
    path, with the default of no roots) is refused before it is opened. `field` names the
    spec field in messages."""
    if dataset.startswith("ds_"):
        row = db.get_dataset(dataset) if db is not None else None
        if row is None:
            raise user_error(f"{field} {dataset!r} was not found; upload it with POST /v1/datasets first")
        try:
            path = store.local_file(row.store_key)  # a cached download where the store is remote
        except FileNotFoundError:
            raise user_error(
                f"{field} {dataset!r} ({row.name}) is missing from the artifact store at {store.uri(row.store_key)}; "
                "upload it again with POST /v1/datasets"
            ) from None
        except ArtifactCorrupt as exc:
            raise user_error(
                f"{field} {dataset!r} ({row.name}) is corrupt in the artifact store at {exc.where}: stored with "
                f"sha256 {exc.expected}, reads as {exc.actual}; upload it again with POST /v1/datasets"
            ) from None
        return path, row.name
    try:
        path = allowed_path(dataset, field, roots)
    except PathRefused as exc:
        raise user_error(str(exc)) from None
    if not path.is_file():
        raise user_error(
            f"{field} {dataset!r} is neither an uploaded dataset id (ds_...) nor a file on the worker; "
            "upload it with POST /v1/datasets or `lockn-tune tune`, or give an absolute path"
        )
    return path, Path(dataset).name or path.name  # the name the user gave, not a symlink's target


def preflight_report(
    run_id: str,
    spec: RunSpec,
    db,
    store,
    hardware: HardwareInfo | None = None,
    *,
    roots: Sequence[Path] = (),
    base: ResolvedBaseModel | None = None,
) -> PreflightReport:
    """The full report. Problems a user can fix are collected as errors, not raised;
    only a missing model or dataset raises (nothing else can be checked without them).
    `hardware` None (unknown): the plan assumes a CPU worker and says so. `base`: the model
    as fetched from the Hub into the store; None resolves spec.base_model on this machine."""
    errors, warnings = [], []
    hp = spec.hyperparameters

    base = base or resolve_base_model(spec.base_model, roots=roots)
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
    if hardware and hardware.nvidia_driver and hardware.device == "cpu":
        warnings.append(
            f"the training worker has an NVIDIA driver ({hardware.nvidia_driver}) but torch "
            f"{hardware.torch_version} (CUDA {hardware.cuda_version}) cannot use the GPU: "
            "update the driver or install a torch build for its CUDA version; until then training runs on the CPU"
        )
    elif hardware and hardware.device == "cpu":
        warnings.append("the training worker has no GPU: training runs on the CPU, which is fine for tiny models and slow for real ones")
    if spec.method == Method.qlora and hardware and not hardware.bitsandbytes_usable:
        errors.append("method 'qlora' needs bitsandbytes, which does not load on the training worker; use method 'lora'")

    data_path, source = resolve_dataset_path(spec.dataset, db, store, roots=roots)
    examples, validation = read_dataset(data_path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=source)
    if validation.refused:
        errors.append(validation.message)
    elif validation.bad_rows:
        warnings.append(validation.message)
    eval_examples, eval_validation, eval_source = None, None, None
    if spec.eval_dataset:
        # The same resolution, reading and validation as the training file.
        eval_path, eval_source = resolve_dataset_path(spec.eval_dataset, db, store, roots=roots, field="eval_dataset")
        eval_examples, eval_validation = read_dataset(
            eval_path, max_bad_row_fraction=spec.max_bad_row_fraction, source_name=eval_source
        )
        if eval_validation.refused:
            errors.append(f"eval_dataset: {eval_validation.message}")
        elif eval_validation.bad_rows:
            warnings.append(f"eval_dataset: {eval_validation.message}")
        if validation.shape and eval_validation.shape and validation.shape != eval_validation.shape:
            errors.append(
                f"eval_dataset {eval_source} has {eval_validation.shape.value} rows but dataset {source} has "
                f"{validation.shape.value} rows; give both files the same shape"
            )

    tokenizer = load_tokenizer(base.path)
    rendered = [render_text(e, tokenizer) for e in examples]
    eval_rendered = [render_text(e, tokenizer) for e in eval_examples] if eval_examples is not None else None
    split = split_rows(
        [r.key for r in rendered], [r.prompt_key for r in rendered], spec.eval_fraction, hp.seed,
        [r.key for r in eval_rendered] if eval_rendered is not None else None,
        [r.prompt_key for r in eval_rendered] if eval_rendered is not None else None,
    )
    n_train, n_eval = len(split.train), len(split.eval)
    errors += _split_errors(split, examples, eval_examples, validation, eval_validation, source, eval_source)
    warnings += _split_warnings(split, eval_examples, source, eval_source)
    values, choices = resolve_simple_defaults(spec, n_train, num_params)
    values["batching"] = hp.batching or _choose_batching(hardware, choices)

    dataset = None
    if examples:
        dataset, max_seq_len, seq_choice = _dataset_preflight(
            examples, rendered, validation, tokenizer, hp.max_seq_len, context, hp.seed, split,
            eval_examples, eval_rendered, eval_validation, source, eval_source,
        )
        if seq_choice:
            choices.append(seq_choice)
        if hp.max_seq_len and dataset.truncated_share > TRUNCATION_REFUSED:
            errors.append(_truncation_message(dataset, hp.max_seq_len, refused=True))
        elif dataset.long_rows_total:
            warnings.append(_truncation_message(dataset, max_seq_len, refused=False))
        duplicates = _duplicates_message(dataset, source)
        if duplicates:
            (errors if dataset.distinct_rows < MIN_DISTINCT_SHARE * validation.valid_rows else warnings).append(duplicates)
    else:
        max_seq_len = hp.max_seq_len or 1024

    shape = ModelShape.from_config(base.config, num_params)
    precision = hardware.precision if hardware else "float32"
    assumed = _assumed_memory_warning(hardware)
    if assumed:
        warnings.append(assumed)
    memory, batch_values, batch_choices, memory_errors, estimates = _plan_memory(
        spec, shape, max_seq_len, hardware, precision, values
    )
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
        defaults=choices,
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
    step_seconds = _seconds(num_params, per_step * mean_tokens, hardware)
    report.estimated_seconds = round(step_seconds * total, 1)
    too_long = _duration_error(resolved, total, step_seconds, n_train, per_step)
    if too_long:
        report.errors.append(too_long)
        report.ok = False
        return report
    report.plan = TrainingPlan(
        run_id=run_id,
        spec=spec,
        spec_sha256=spec.sha256(),
        base_model_path=str(base.path),
        base_model_id=spec.base_model,
        base_model_revision=base.revision,
        base_model_manifest_key=base.manifest_key,
        model_type=base.config.get("model_type", "unknown"),
        num_parameters=num_params,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dataset_shape=validation.shape.value if validation.shape else "unknown",
        valid_rows=validation.valid_rows,
        train_rows=n_train,
        eval_rows=n_eval,
        dataset_sha256=validation.sha256,
        eval_dataset_sha256=eval_validation.sha256 if eval_validation else None,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(resolved.warmup_ratio * total),
        memory_estimates=estimates,
        warnings=report.warnings,
        hyperparameters=resolved,
        precision=precision,
    )
    return report


def _choose_batching(hardware: HardwareInfo | None, choices: list[Explanation]) -> str:
    """Padding-free wherever the attention the recipe loads supports it: SDPA and eager build
    the per-example mask from position_ids (worker_gpu/packing.py), on CPU and on CUDA."""
    device = "the GPU" if hardware and hardware.device == "cuda" else "the CPU"
    why = (
        f"on {device} a padded slot costs as much as a real token; packed rows carry none, and SDPA "
        "keeps examples apart with the mask transformers builds from position_ids (the same loss as padded)"
    )
    choices.append(Explanation(field="batching", value="padding_free", why=why))
    return "padding_free"


def _split_errors(split, examples, eval_examples, validation, eval_validation, source, eval_source) -> list[str]:
    """Refusals about the split: nothing to hold out, or an eval file that is all copies of training rows."""
    if validation.refused or (eval_validation is not None and eval_validation.refused):
        return []  # the validation message already says what to fix
    if eval_examples is None:
        if len(split.train) < 1 or len(split.eval) < 1:
            return [
                f"dataset {source} has {validation.valid_rows} valid rows: too few to split into train and eval; "
                "add rows (a few dozen at the very least), or give an eval_dataset"
            ]
        return []
    if not split.eval:
        lines = [eval_examples[i].line for i in split.excluded]
        return [
            f"every row of eval_dataset {eval_source} also occurs in dataset {source} (lines {_lines(lines)}): "
            "eval would measure rows the model trains on. Give eval rows that are not in the training file, "
            "or leave eval_dataset out to hold out eval_fraction of the dataset"
        ]
    return []


def _split_warnings(split, eval_examples, source, eval_source) -> list[str]:
    out = []
    if eval_examples is not None and split.excluded and split.eval:
        total = len(split.excluded) + len(split.eval)
        lines = [eval_examples[i].line for i in split.excluded]
        out.append(
            f"eval_dataset {eval_source}: {len(split.excluded)} of {total} rows ({_share(len(split.excluded) / total)}) "
            f"also occur in dataset {source} and are left out of eval: lines {_lines(lines)}"
        )
    if split.eval_prompt_in_train:
        out.append(
            f"{split.eval_prompt_in_train} of {len(split.eval)} eval rows "
            f"({_share(split.eval_prompt_in_train / len(split.eval))}) have the same prompt as a train row with a "
            "different answer; eval loss on them partly measures what training saw"
        )
    return out


def _dataset_preflight(
    examples, rendered, validation, tokenizer, max_seq_len, context, seed, split,
    eval_examples, eval_rendered, eval_validation, source, eval_source,
):
    """Samples, token lengths, truncation and duplicates; and max_seq_len when it is unset.

    Length statistics come from a seeded sample; the truncation check covers every row of
    both files: a byte count bounds each row's tokens, and only rows that may exceed are tokenized.
    """
    picked = list(range(len(examples)))
    if len(picked) > MEASURED_ROWS:
        picked = sorted(random.Random(seed).sample(picked, MEASURED_ROWS))
    lengths, renders, known = [], {}, {}
    for i in picked:
        r = render_example(examples[i], tokenizer, context, rendered[i])
        lengths.append(r.length_before_truncation)
        if r.length_exact:
            known[i] = r.length_before_truncation
        if len(renders) < 3:
            renders[i] = r
    ordered = sorted(lengths)
    choice = None
    if max_seq_len is None:
        covering = ordered[min(len(ordered) - 1, math.ceil(0.98 * len(ordered)) - 1)]
        max_seq_len = next((c for c in SEQ_CANDIDATES if c >= covering and c <= context), context)
        choice = Explanation(
            field="max_seq_len", value=max_seq_len,
            why=f"the shortest of {', '.join(map(str, SEQ_CANDIDATES[:4]))}, ... that holds 98% of rows whole "
            f"(98th percentile: {covering} tokens; the model's context: {context})",
        )
    long_rows = _long_rows(examples, rendered, tokenizer, max_seq_len, known, source if eval_source else None)
    truncated = len(long_rows)
    if eval_examples:
        long_rows += _long_rows(eval_examples, eval_rendered, tokenizer, max_seq_len, {}, eval_source)
    duplicates = count_duplicates([e.line for e in examples], [r.key for r in rendered])
    samples = [
        RenderedSample(
            line=examples[i].line,
            text=tokenizer.decode(r.input_ids[:max_seq_len]),
            trained_text=tokenizer.decode([t for t in r.labels[:max_seq_len] if t != IGNORE]),
        )
        for i, r in renders.items()
    ]
    stats = TokenLengths.of(lengths)
    n_eval = len(split.eval)
    dataset = DatasetPreflight(
        validation=validation, samples=samples, token_lengths=stats, measured_rows=len(lengths),
        truncated_rows=truncated, truncated_share=round(truncated / len(examples), 4),
        long_rows=long_rows[:MAX_LONG_ROWS], long_rows_total=len(long_rows),
        answer_lost_rows=sum(1 for r in long_rows if r.answer_kept_share == 0),
        duplicate_rows=duplicates.repeats, distinct_rows=duplicates.distinct,
        most_repeated=[RepeatedRow(line=line, occurrences=n) for line, n in duplicates.most_repeated],
        train_rows=len(split.train), eval_rows=n_eval,
        eval_source=eval_source, eval_validation=eval_validation,
        eval_excluded_rows=len(split.excluded),
        eval_excluded_lines=[eval_examples[i].line for i in split.excluded[:MAX_LONG_ROWS]] if eval_examples else [],
        eval_in_train_share=round(split.eval_in_train / n_eval, 4) if n_eval else 0.0,
        eval_prompt_in_train_rows=split.eval_prompt_in_train,
    )
    return dataset, max_seq_len, choice


def _long_rows(examples, rendered, tokenizer, max_seq_len, known, source) -> list[LongRow]:
    """Every row longer than max_seq_len, with what truncation does to it. `known` holds exact
    lengths measured already; `source` names the file in messages (None: the only file)."""
    out = []
    for i, (example, text) in enumerate(zip(examples, rendered)):
        if not text.may_exceed(max_seq_len) or known.get(i, max_seq_len + 1) <= max_seq_len:
            continue
        r = render_example(example, tokenizer, max_seq_len, text)
        if not r.truncated:
            continue
        where = f"{source} line {example.line}" if source else f"line {example.line}"
        tokens = f"{'' if r.length_exact else 'about '}{r.length_before_truncation:,} tokens"
        if r.answer_kept_share == 0:
            what = "the whole answer is cut, the row trains on nothing"
        elif r.answer_kept_share < 1:
            what = f"the last {_share(1 - r.answer_kept_share)} of the answer is cut"
        else:
            what = "only what follows the answer is cut"
        out.append(LongRow(
            source=source or "dataset", line=example.line, tokens=r.length_before_truncation,
            tokens_exact=r.length_exact, answer_kept_share=round(r.answer_kept_share, 4),
            effect=f"{where}: {tokens}, cut to {max_seq_len}: {what}",
        ))
    return out


def _truncation_message(dataset: DatasetPreflight, max_seq_len: int, refused: bool) -> str:
    """How many rows max_seq_len cuts, the first of them line by line, and what to do."""
    lengths = dataset.token_lengths
    fix = next((c for c in SEQ_CANDIDATES if c >= lengths.p95), None)
    valid = dataset.validation.valid_rows
    text = (
        f"max_seq_len {max_seq_len} truncates {_share(dataset.truncated_share)} of rows "
        f"({dataset.truncated_rows:,} of {valid:,})"
    )
    if dataset.long_rows_total != dataset.truncated_rows:
        text += f" and {dataset.long_rows_total - dataset.truncated_rows:,} rows of eval_dataset {dataset.eval_source}"
    if dataset.answer_lost_rows:
        text += f"; {dataset.answer_lost_rows:,} of them lose their whole answer and train on nothing"
    listed = dataset.long_rows[:LISTED_LONG_ROWS]
    text += ". " + "; ".join(r.effect for r in listed)
    if dataset.long_rows_total > len(listed):
        text += f"; and {dataset.long_rows_total - len(listed):,} more (see the report's long_rows)"
    hint = f". Raise it to {fix} (holds 95% of rows whole)" if fix and fix > max_seq_len else ". Shorten the longest rows"
    return text + (hint + " or shorten the rows" if refused else hint + " or leave them out")


def _duplicates_message(dataset: DatasetPreflight, source: str) -> str | None:
    """The real multiplicity of repeated rows; None when every row is distinct."""
    if not dataset.duplicate_rows:
        return None
    rows, distinct = dataset.validation.valid_rows, dataset.distinct_rows
    worst = ", ".join(f"the row at line {r.line} occurs {r.occurrences:,} times" for r in dataset.most_repeated)
    if distinct < MIN_DISTINCT_SHARE * rows:
        return (
            f"{source} is mostly duplicates: {distinct:,} distinct rows among {rows:,} ({worst}). Training on copies "
            "learns them by heart and leaves too few distinct rows to evaluate. Remove the copies "
            "(for more passes over the data, raise hyperparameters.epochs instead)"
        )
    return (
        f"{dataset.duplicate_rows:,} rows of {source} are exact copies of another row: {distinct:,} distinct rows among "
        f"{rows:,} ({worst}). Each copy trains as one more row; copies always stay on the same side of the "
        "train/eval split"
    )


def _duration_error(hp: ResolvedHyperparameters, total: int, step_seconds: float, n_train: int, per_step: int) -> str | None:
    """A plan that would run for longer than anyone waits, or for an absurd number of steps, with the numbers."""
    seconds = step_seconds * total
    if seconds <= MAX_PLANNED_SECONDS and total <= MAX_PLANNED_STEPS:
        return None
    if hp.max_steps:
        what, fix = f"max_steps {hp.max_steps:,}", "lower max_steps, or remove it to train by epochs"
    else:
        what = f"epochs {hp.epochs} over {n_train:,} train rows at {per_step} rows per step ({total:,} steps)"
        fix = "lower epochs or use fewer rows"
    limit = f"the limit is {_duration(MAX_PLANNED_SECONDS)} and {MAX_PLANNED_STEPS:,} steps"
    return f"{what} at ~{_duration(step_seconds)} per step is about {_duration(seconds)} of training ({limit}); {fix}"


def _duration(seconds: float) -> str:
    """A duration in the unit a person would use, to three significant figures."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{_sig(seconds / size)} {unit}"
    return f"{_sig(seconds)} s" if seconds >= 0.1 else f"{seconds * 1000:.2g} ms"


def _sig(x: float) -> str:
    """Three significant figures with thousands separators: 193,000 / 6.1 / 12.3."""
    if x >= 100:
        return f"{float(f'{x:.3g}'):,.0f}"
    return f"{x:.3g}"


def _share(x: float) -> str:
    """A share as a percentage that never rounds a few rows away to 0%."""
    if x == 0 or x >= 0.01:
        return f"{x:.0%}"
    return f"{x:.1%}" if x >= 0.001 else "<0.1%"


def _lines(lines: list[int], listed: int = 20) -> str:
    shown = ", ".join(map(str, lines[:listed]))
    return shown + (f" and {len(lines) - listed:,} more" if len(lines) > listed else "")


def _available(hardware: HardwareInfo | None) -> tuple[str, int]:
    """Where training runs and the bytes it may plan for: the shared rule, or the stated assumption."""
    usable = usable_memory(hardware)
    return usable.device, usable.bytes if usable.bytes is not None else int(ASSUMED_MEMORY_BYTES * USABLE_RAM)


def _assumed_memory_warning(hardware: HardwareInfo | None) -> str | None:
    if usable_memory(hardware).bytes is not None:
        return None
    device, available = _available(hardware)
    return (
        f"the worker did not report its free memory, so the plan assumes {_gb(available)} usable on {device}; "
        "set micro_batch_size and gradient_checkpointing in the spec to plan for the real machine"
    )


def _plan_memory(spec: RunSpec, shape, max_seq_len: int, hardware: HardwareInfo | None, precision: str, values: dict):
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
            batching=values["batching"],
        )

    for gc in checkpointing:
        for mbs in micro:
            est = estimate(spec.method.value, mbs, gc)
            if est.total <= available:
                accum = hp.grad_accum or max(1, math.ceil(effective / mbs))
                choices = []
                if hp.micro_batch_size is None:
                    choices.append(Explanation(field="micro_batch_size", value=mbs, why=f"the largest that fits in {_gb(available)} on {device}"))
                if hp.grad_accum is None:
                    choices.append(Explanation(field="grad_accum", value=accum, why=f"{mbs} x {accum} reaches the preset's batch of {effective} examples per step"))
                if hp.gradient_checkpointing is None:
                    why = "needed to fit: activations are recomputed in backward" if gc else "not needed: it would only slow training"
                    choices.append(Explanation(field="gradient_checkpointing", value=gc, why=why))
                memory = MemoryPlan(
                    device=device, estimate_bytes=est.total, available_bytes=available, fits=True,
                    adapter_bytes=est.lora_weights, lines=est.lines(),
                )
                # The out-of-memory back-off may pick any divisor of the micro-batch (TrainingPlan.with_micro_batch).
                estimates = {d: estimate(spec.method.value, d, gc).total for d in range(1, mbs) if mbs % d == 0}
                estimates[mbs] = est.total
                return memory, {"micro_batch_size": mbs, "grad_accum": accum, "gradient_checkpointing": gc}, choices, [], estimates

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
    return memory, {}, [], [message + " To fit: " + "; or ".join(fixes) + "."], {}


def matrix_memory_refusal(spec: RunSpec, hardware: HardwareInfo | None) -> str | None:
    """Why a model-matrix model cannot be trained with the spec's method on this worker, judged
    from its matrix entry before any weights are fetched; None when it may fit, when the model is
    not in the matrix, or when the worker's memory is unknown.

    The same planner as a full preflight (_plan_memory), at the least the run can need: the
    smallest micro-batch and checkpointing the spec allows, and the spec's max_seq_len or the
    shortest the planner would choose (the dataset's lengths need the tokenizer, which is not
    here yet). Preflight plans again from the real config once the model is stored."""
    from schemas.model_matrix import load_matrix

    entry = load_matrix().get(spec.base_model)
    if entry is None or entry.kind != "llm" or usable_memory(hardware).bytes is None:
        return None
    hp = spec.hyperparameters
    values = {"lora_r": hp.lora_r or RANK[spec.preset], "batching": hp.batching or "padding_free"}
    _, _, _, errors, _ = _plan_memory(
        spec, ModelShape.from_matrix_entry(entry), hp.max_seq_len or SEQ_CANDIDATES[0], hardware,
        hardware.precision, values,
    )
    if not errors:
        return None
    return (
        f"base_model {spec.base_model!r} with method {spec.method.value!r} (planned from its model-matrix entry, "
        f"before downloading it): {errors[0]}"
    )


def _matrix_llm_architectures() -> set[str]:
    """Architectures the model matrix supports for LLM tuning (Gemma 3 4B+ is a ...ForConditionalGeneration)."""
    from schemas.model_matrix import load_matrix

    return {m.architecture for m in load_matrix().models if m.kind == "llm"}


def _disk_check(memory: MemoryPlan | None, spec: RunSpec, hardware: HardwareInfo | None, data_path: Path) -> str | None:
    """Checkpoints (adapter + two Adam moments, kept keep_checkpoints + 1 at a time) and the data snapshot must fit."""
    free = hardware.disk_free_bytes if hardware else None
    if not free or memory is None:
        return None
    need = 3 * memory.adapter_bytes * (spec.keep_checkpoints + 2) + 3 * data_path.stat().st_size
    if need > free:
        return f"checkpoints and the data snapshot need about {_gb(need)} of disk; the worker's home has {_gb(free)} free"
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _seconds(num_params: int, tokens: float, hardware: HardwareInfo | None) -> float:
    """Rough: 6 x params x tokens FLOPs at a typical utilisation of the device's peak."""
    if hardware and hardware.device == "cuda":
        flops = 300e12 if hardware.bf16_supported else 30e12
        utilisation = 0.35
    else:
        flops = (hardware.cpu_count if hardware else 2) * 30e9
        utilisation = 0.3
    return 6 * num_params * tokens / (flops * utilisation)
