"""structlog set-up shared by the API, the workers and the supervisor.

Every line, structlog's and the standard library's (Temporal's workflow and activity
loggers, uvicorn, libraries), goes through one handler on the root logger and is rendered
the same way: JSON lines when LOCKN_TUNE_LOG_JSON=1 (what `lockn-tune up` and the deploy
images set), key=value on a terminal otherwise.

Lines carry the run they belong to: inside an activity, `runtime.temporal.ActivityTelemetry`
binds run_id (= workflow id), workflow_id, activity, attempt and task_queue; lines from
`workflow.logger` get run_id, workflow_id and workflow_type from the record Temporal makes
(workflow logs are skipped while a workflow replays, so each appears once); lines inside a
traced request or activity carry its trace_id and span_id.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
import temporalio.activity
import temporalio.workflow

from runtime.telemetry import current_trace_ids
from schemas.settings import Settings

# Marks the root handler this module installs, so configuring again replaces it and leaves
# other handlers (pytest's, an embedding application's) alone.
HANDLER_NAME = "lockn-tune"


def configure_logging(process: str, settings: Settings | None = None, *, stream: TextIO | None = None) -> None:
    """Render this process's logs as settings.log_json and settings.log_level say.

    settings defaults to the environment (LOCKN_TUNE_LOG_JSON, LOCKN_TUNE_LOG_LEVEL);
    stream defaults to stderr.
    """
    settings = settings or Settings()
    json_logs = settings.log_json
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        level = logging.INFO

    def add_process(_logger: Any, _name: str, event: dict) -> dict:
        event.setdefault("process", process)
        return event

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        temporal_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_process,
        add_trace_ids,
    ]
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    # In JSON the run's fields are keys; Temporal's copy of them on the message is noise there.
    temporalio.workflow.logger.workflow_info_on_message = not json_logs
    temporalio.activity.logger.activity_info_on_message = not json_logs
    # Per-request client logs drown out what matters.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Alembic announces every plugin it sets up, in every process that opens the DB.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # bitsandbytes looks for an optional hub kernel package on CPU; it works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def temporal_fields(_logger: Any, _name: str, event: dict) -> dict:
    """Fields of Temporal's workflow.logger / activity.logger records as keys of the line.

    The run id is the workflow id; Temporal's own run id (one per continue-as-new) becomes
    temporal_run_id.
    """
    record = event.get("_record")
    if record is None:
        return event
    wf = getattr(record, "temporal_workflow", None)
    if isinstance(wf, dict):
        event.setdefault("run_id", wf.get("workflow_id"))
        event.setdefault("workflow_id", wf.get("workflow_id"))
        event.setdefault("workflow_type", wf.get("workflow_type"))
        event.setdefault("temporal_run_id", wf.get("run_id"))
        event.setdefault("task_queue", wf.get("task_queue"))
    act = getattr(record, "temporal_activity", None)
    if isinstance(act, dict):
        event.setdefault("run_id", act.get("workflow_id"))
        event.setdefault("workflow_id", act.get("workflow_id"))
        event.setdefault("activity", act.get("activity_type"))
        event.setdefault("attempt", act.get("attempt"))
        event.setdefault("task_queue", act.get("task_queue"))
    for key in ("update_id", "update_name"):
        value = getattr(record, key, None)
        if value is not None:
            event.setdefault(key, value)
    return event


def add_trace_ids(_logger: Any, _name: str, event: dict) -> dict:
    for key, value in current_trace_ids().items():
        event.setdefault(key, value)
    return event
