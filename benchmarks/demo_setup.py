"""What the benchmarks share: the demo's tiny model, data and spec, and a stack on free loopback ports."""

from __future__ import annotations

from pathlib import Path

from activities.demo_data import demo_texts, write_demo_dataset
from cli.demo import demo_spec
from schemas.run_spec import RunSpec
from schemas.settings import Settings


def demo_inputs(tmp: Path) -> tuple[Path, Path, RunSpec]:
    """A tiny Llama, the demo instruction data and the demo spec, under tmp."""
    from worker_gpu.tiny_model import make_tiny_model

    model = make_tiny_model(tmp / "tiny-llama", demo_texts())
    data = write_demo_dataset(tmp / "data.jsonl")
    return model, data, demo_spec(model, data)


def loopback_settings(home: Path, first_port: int, **overrides) -> Settings:
    """Settings for a stack under home whose API, Temporal and UI ports are free ones from first_port on.
    The folder holding home is an allowed root: demo_inputs writes the model and data beside home."""
    from cli.stack import port_in_use

    ports = [p for p in range(first_port, first_port + 100) if not port_in_use("127.0.0.1", p)][:3]
    overrides.setdefault("allowed_roots", str(home.parent))
    return Settings(
        home=home, api_port=ports[0], temporal_address=f"127.0.0.1:{ports[1]}", temporal_ui_port=ports[2], **overrides
    )
