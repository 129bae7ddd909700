"""What this machine offers for training: GPU, memory, disk, and whether QLoRA's bitsandbytes loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from schemas.hardware import HardwareInfo

MEMINFO = Path("/proc/meminfo")


def read_meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """/proc/meminfo as bytes by key (MemTotal, MemAvailable, ...); empty where there is no such file."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def _disk_free(path: Path) -> int:
    # The home may not exist yet; its nearest existing parent is on the same disk.
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def bitsandbytes_usable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # broken installs raise more than ImportError
        return False
    return True


def nvidia_driver(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The loaded NVIDIA kernel driver's version, from its first line; None without one."""
    try:
        first = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), first.strip())


def worker_hardware(home: Path | None = None) -> HardwareInfo:
    """This machine's hardware. Imports torch (slow the first time): call it once and keep the result.

    It describes the machine it runs on; in the embedded stack the API and the workers share one.
    """
    meminfo = read_meminfo()
    info: dict = {
        "device": "cpu",
        "cpu_count": os.cpu_count() or 1,
        "memory_total_bytes": meminfo.get("MemTotal"),
        "memory_available_bytes": meminfo.get("MemAvailable"),
        "disk_free_bytes": _disk_free(Path(home or Path.home()).expanduser()),
        "bitsandbytes_usable": bitsandbytes_usable(),
        "nvidia_driver": nvidia_driver(),
    }
    try:
        import torch
    except Exception:
        return HardwareInfo(**info)
    info["torch_version"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            gpu_name=props.name,
            gpu_memory_bytes=props.total_memory,
            compute_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return HardwareInfo(**info)
