"""What a manifest says about the code and machine that made an artifact."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("lockn-tune", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "temporalio")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_version() -> str:
    """The git commit of the source tree when run from a checkout, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"lockn-tune {package_versions()['lockn-tune']}"


def hardware() -> dict:
    """The machine an activity runs on, for manifests (imports torch: GPU-side code only)."""
    from runtime.hardware import worker_hardware

    keep = ("device", "gpu_name", "gpu_memory_bytes", "compute_capability", "cuda_version", "torch_version", "cpu_count")
    report = worker_hardware().model_dump()
    return {"platform": platform.platform(), "machine": platform.machine(), **{k: report[k] for k in keep if report.get(k)}}
