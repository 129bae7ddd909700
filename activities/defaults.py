"""Defaults for people who are not ML experts: every unset knob gets a value and a reason.

The rules follow common practice for LoRA/QLoRA on instruction data (QLoRA paper; the
PEFT and TRL docs): fewer passes over bigger datasets, a smaller learning rate for bigger
models, rank by how much the preset is willing to spend.
"""

from __future__ import annotations

from schemas.preflight import Explanation
from schemas.run_spec import Preset, RunSpec

RANK = {Preset.quick: 8, Preset.balanced: 16, Preset.thorough: 32}
EFFECTIVE_BATCH = {Preset.quick: 8, Preset.balanced: 16, Preset.thorough: 32}
WARMUP_RATIO = 0.03


def default_epochs(train_rows: int, preset: Preset) -> tuple[int, str]:
    if train_rows < 300:
        epochs, size = 5, "under 300 rows: several passes are needed to learn from so little data"
    elif train_rows < 1000:
        epochs, size = 3, "300-1,000 rows"
    elif train_rows < 10_000:
        epochs, size = 2, "1,000-10,000 rows"
    else:
        epochs, size = 1, "over 10,000 rows: one pass is usually enough and avoids overfitting"
    if preset == Preset.quick:
        return 1, f"preset quick: one pass ({train_rows} train rows)"
    if preset == Preset.thorough:
        return epochs + 1, f"{size}; preset thorough adds one pass"
    return epochs, size


def default_learning_rate(num_parameters: int) -> tuple[float, str]:
    billions = num_parameters / 1e9
    if num_parameters < 100e6:
        return 1e-3, f"a small model ({num_parameters / 1e6:.0f}M parameters) tolerates a large LoRA learning rate"
    if billions < 1:
        return 5e-4, f"{billions:.1f}B parameters: a sub-1B model takes a larger LoRA learning rate"
    if billions < 13:
        return 2e-4, f"{billions:.1f}B parameters: the usual LoRA/QLoRA learning rate for 1-13B models"
    return 1e-4, f"{billions:.0f}B parameters: large models train stably at a lower learning rate"


def resolve_simple_defaults(spec: RunSpec, train_rows: int, num_parameters: int) -> tuple[dict, list[Explanation]]:
    """Everything but the memory- and data-length-driven knobs (max_seq_len, micro-batch,
    accumulation, checkpointing), which the planner decides."""
    hp = spec.hyperparameters
    values, choices = {}, []

    def choose(field, value, why):
        values[field] = value
        choices.append(Explanation(field=field, value=value, why=why))

    if hp.epochs is None:
        choose("epochs", *default_epochs(train_rows, spec.preset))
    if hp.learning_rate is None:
        choose("learning_rate", *default_learning_rate(num_parameters))
    if hp.warmup_ratio is None:
        choose("warmup_ratio", WARMUP_RATIO, "3% warmup keeps the first steps from undoing the base model")
    if hp.lora_r is None:
        choose("lora_r", RANK[spec.preset], f"preset {spec.preset.value}")
    rank = values.get("lora_r", hp.lora_r)
    if hp.lora_alpha is None:
        choose("lora_alpha", 2 * rank, "alpha = 2 x rank, a common scale for LoRA updates")
    return values, choices
