"""The base model kept loaded in worker_gpu between the activities of one run.

A run's baseline eval, its chunks and its tuned eval all load the same base model; loading
it once per run, not once per activity, makes a chunk cost its training. The cache holds
one model: another run, or a plan that loads the base differently (another key), takes the
slot, and the old model is freed before the new one loads.

Resume stays exact because the cached base is given back as it was loaded: the adapter
layers PEFT injected in place are taken out again, and hooks, requires_grad flags and the
train/eval mode are put back. The adapter, optimizer, scheduler and RNG still come from
the committed checkpoint every chunk. A borrow that ends in an exception (out of memory,
cancel, a crash in the recipe) drops the model instead, so nothing half-changed is reused.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from schemas.activities import TrainingPlan

if TYPE_CHECKING:  # torch loads with the first model, not with the worker's imports
    import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Pristine:
    """What PEFT changes in place on a base model, as it was after loading."""

    hooks: dict[str, tuple[frozenset[int], frozenset[int]]]  # module name -> forward, forward-pre hook ids
    requires_grad: dict[str, bool]
    training: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> "_Pristine":
        return cls(
            hooks={
                name: (frozenset(m._forward_hooks), frozenset(m._forward_pre_hooks)) for name, m in model.named_modules()
            },
            requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
            training=model.training,
        )

    def restore(self, model: torch.nn.Module) -> None:
        """Take out adapter layers, then put hooks, requires_grad and mode back as they were."""
        strip_adapter_layers(model)
        for name, module in model.named_modules():
            forward, pre = self.hooks.get(name, (frozenset(), frozenset()))
            # PeftModel registers an input-grad hook on the embeddings at every wrap (gradient
            # checkpointing); without this they would pile up, one more per chunk.
            for hook_id in set(module._forward_hooks) - forward:
                del module._forward_hooks[hook_id]
                module._forward_hooks_with_kwargs.pop(hook_id, None)
                module._forward_hooks_always_called.pop(hook_id, None)
            for hook_id in set(module._forward_pre_hooks) - pre:
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for name, param in model.named_parameters():
            param.requires_grad_(self.requires_grad[name])
            param.grad = None
        model.train(self.training)


def strip_adapter_layers(model: torch.nn.Module) -> None:
    """Replace every PEFT tuner layer in model by the base layer it wraps (what PEFT's
    `unload()` does, without needing the PeftModel that injected them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in tuned:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


class BaseModelCache:
    """One loaded base model, keyed by the run and everything that changes how it loads
    (`base_model_key`). Borrowed by one activity at a time (the GPU worker runs one)."""

    def __init__(self, load: Callable[[TrainingPlan, "torch.device"], "torch.nn.Module"] | None = None):
        self._load = load
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: torch.nn.Module | None = None
        self._pristine: _Pristine | None = None

    @property
    def key(self) -> tuple | None:
        """The key of the model held now (None: the slot is empty)."""
        return self._key

    @contextmanager
    def borrow(self, run_id: str, plan: TrainingPlan, device: torch.device) -> Iterator[torch.nn.Module]:
        """The base model for plan, loaded now or kept from this run's previous activity.
        The caller may wrap it with an adapter; on a normal exit the base is restored and kept,
        on an exception it is dropped."""
        from worker_gpu.model_loading import base_model_key, load_base_model

        key = (run_id, *base_model_key(plan, device))
        with self._lock:
            if self._key != key:
                self._free()
                model = (self._load or load_base_model)(plan, device)
                self._key, self._model, self._pristine = key, model, _Pristine.of(model)
                log.info("base_model.loaded", run_id=run_id, path=plan.base_model_path, device=str(device))
            else:
                log.info("base_model.reused", run_id=run_id, path=plan.base_model_path, device=str(device))
            try:
                yield self._model
            except BaseException:
                self._free()
                raise
            self._pristine.restore(self._model)

    def release(self) -> None:
        """Free the model held (worker shutdown)."""
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._model is None:
            return
        import torch

        self._key = self._model = self._pristine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
