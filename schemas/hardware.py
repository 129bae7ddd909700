"""What a training worker reports about its machine: the contract between worker_gpu's
inspect_hardware, preflight (which plans against it) and GET /v1/models (which judges fits)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def training_precision(device: str | None, bf16_supported: bool | None) -> str:
    """The compute dtype a worker trains in: bfloat16 on a CUDA GPU that supports it, else
    float32. The one rule preflight plans with, GET /v1/models judges fits by, and a chunk
    checks its plan against."""
    return "bfloat16" if device == "cuda" and bf16_supported else "float32"


class HardwareInfo(BaseModel):
    """What a worker machine offers for training."""

    device: Literal["cuda", "cpu"] = Field(description="Where training runs: the first CUDA GPU, else the CPU.")
    gpu_name: str | None = Field(None, description="Name of the GPU; null without one.")
    gpu_memory_bytes: int | None = Field(None, description="Total memory of the GPU in bytes; null without one.")
    compute_capability: str | None = Field(None, description="CUDA compute capability, e.g. '9.0'; null without a GPU.")
    bf16_supported: bool = Field(False, description="The GPU trains in bfloat16; false on CPU (float32 there).")
    cuda_version: str | None = Field(None, description="CUDA version torch was built with; null for a CPU-only torch.")
    torch_version: str | None = Field(None, description="Installed torch version; null when torch does not import.")
    bitsandbytes_usable: bool = Field(False, description="bitsandbytes imports, so QLoRA (4-bit NF4) can load models.")
    cpu_count: int = Field(description="Logical CPUs.")
    memory_total_bytes: int | None = Field(None, description="System memory (MemTotal of /proc/meminfo).")
    memory_available_bytes: int | None = Field(None, description="System memory available now (MemAvailable).")
    disk_free_bytes: int = Field(description="Free disk space where the stack keeps its state (the home directory).")
    nvidia_driver: str | None = Field(None, description="NVIDIA kernel driver version, when one is loaded (even if torch cannot use it).")

    @property
    def precision(self) -> str:
        return training_precision(self.device, self.bf16_supported)
