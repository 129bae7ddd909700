"""The README shows examples/lora.yaml, byte for byte, and that file is a valid spec."""

from __future__ import annotations

import re
from pathlib import Path

from cli.spec_file import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lora.yaml"


def test_readme_spec_block_is_examples_lora_yaml():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    shown = [b for b in blocks if b.startswith("# examples/lora.yaml")]
    assert len(shown) == 1, "the README should show examples/lora.yaml once, in a yaml block starting with its name"
    assert shown[0] == EXAMPLE.read_text(encoding="utf-8"), (
        "README.md's spec block differs from examples/lora.yaml: paste the file into the README"
    )


def test_examples_lora_yaml_is_a_valid_spec():
    spec = load_spec(EXAMPLE)
    # Its dataset ships beside it, named relative to the repository root where the README runs it.
    assert (ROOT / spec.dataset).is_file()
    assert spec.method.value == "lora" and spec.hyperparameters.max_steps
