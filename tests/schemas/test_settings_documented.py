"""Every setting is documented in the README's settings table, and nothing stale is."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_setting():
    text = README.read_text()
    table = text[text.index("## Settings"):]
    documented = set(re.findall(r"^\| `LOCKN_TUNE_([A-Z0-9_]+)`", table, re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), f"settings missing from README: {sorted(fields - documented)}"
    assert documented - fields == set(), f"README documents settings that do not exist: {sorted(documented - fields)}"
