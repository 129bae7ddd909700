"""Fixtures for the observability tests: JSON log lines captured from every process part."""

from __future__ import annotations

import io
import json

import pytest

from runtime.logs import configure_logging
from schemas.settings import Settings


class LogCapture:
    """JSON log lines written since the capture began."""

    def __init__(self):
        self.buf = io.StringIO()

    def start(self, process: str = "tests") -> LogCapture:
        configure_logging(process, Settings(log_json=True, log_level="INFO"), stream=self.buf)
        return self

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.buf.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture
def log_capture():
    yield LogCapture()
    configure_logging("tests", Settings(log_json=False))  # back to stderr for the tests after
