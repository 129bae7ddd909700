"""Fault injection for the fault-tolerance tests. Off unless LOCKN_TUNE_FAULTS is set.

LOCKN_TUNE_FAULTS is a comma-separated list of one-shot faults:

    model_load          SIGKILL this worker while a chunk loads its model
    step=N              SIGKILL this worker right after optimizer step N
    checkpoint_write    SIGKILL this worker after a checkpoint's files are up, before its manifest
    oom_above=N         raise an out-of-memory error in any step with micro-batch > N
    slow_eval=S         the first evaluate on this home spends S more seconds on every eval
                        batch and every generated token (a slow GPU), so a test can catch a
                        run in its eval

Each kill (and slow_eval) fires once per home directory (a marker under HOME/faults/), so the worker the
supervisor restarts carries on. Nothing here runs unless the variable names the fault.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from schemas.settings import Settings


def _faults(settings: Settings) -> dict[str, str]:
    out = {}
    for item in filter(None, (f.strip() for f in settings.faults.split(","))):
        name, _, value = item.partition("=")
        out[name] = value
    return out


def kill_point(settings: Settings, point: str, step: int | None = None) -> None:
    """SIGKILL this process if the fault `point` (or `step=N`) is armed and has not fired yet."""
    faults = _faults(settings)
    if not faults:
        return
    if point == "step":
        if faults.get("step") != str(step):
            return
        name = f"step={step}"
    elif point in faults:
        name = point
    else:
        return
    marker = Path(settings.home) / "faults" / name
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def injected_oom(settings: Settings, micro_batch_size: int) -> Callable[[], None] | None:
    """The recipe's before_step hook under the oom_above=N fault: every step of a micro-batch
    above N raises torch's out-of-memory error. None when the fault is off or the batch fits."""
    value = _faults(settings).get("oom_above")
    if not value or micro_batch_size <= int(value):
        return None

    def out_of_memory() -> None:
        import torch

        raise torch.OutOfMemoryError(f"injected: micro-batch {micro_batch_size} does not fit (oom_above={value})")

    return out_of_memory


def eval_delay(settings: Settings) -> float:
    """Seconds the slow_eval fault adds per eval batch and generated token: S for the first
    evaluate on this home, 0 for every later one (and whenever the fault is off)."""
    value = _faults(settings).get("slow_eval")
    if not value:
        return 0.0
    marker = Path(settings.home) / "faults" / "slow_eval"
    if marker.exists():
        return 0.0
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    return float(value)
