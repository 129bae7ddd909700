"""structlog set-up shared by the API, the workers and the supervisor."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(process: str, json_logs: bool | None = None) -> None:
    """Key-value logs on a terminal, JSON lines when LOCKN_TUNE_LOG_JSON=1 or not a TTY."""
    if json_logs is None:
        json_logs = os.environ.get("LOCKN_TUNE_LOG_JSON") == "1"
    level = getattr(logging, os.environ.get("LOCKN_TUNE_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level)
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )
    structlog.contextvars.bind_contextvars(process=process)
    # Per-request client logs drown out what matters.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes looks for an optional hub kernel package on CPU; it works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
