"""Fixtures of the store tests: one real S3-protocol server (moto) for the session."""

from __future__ import annotations

import pytest

from tests.s3_server import S3Server


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; `.settings(home)` gives a test its own bucket."""
    with S3Server() as server:
        yield server
