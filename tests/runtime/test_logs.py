"""Log lines say which run, workflow and activity they belong to."""

from __future__ import annotations

import uuid

import structlog
from temporalio.worker import Worker

from runtime.logs import configure_logging
from runtime.temporal import workflow_runner
from schemas.settings import Settings
from tests.runtime.log_workflow import LogsOnce


def test_settings_choose_json_and_level(log_capture, monkeypatch):
    configure_logging("api", Settings(log_json=True, log_level="warning"), stream=log_capture.buf)
    log = structlog.get_logger("tests")
    log.info("quiet.line")
    log.warning("loud.line", run_id="run_x")
    assert [(line["event"], line["level"], line["process"], line["run_id"]) for line in log_capture.lines()] == [
        ("loud.line", "warning", "api", "run_x")
    ]
    # The CLI's call (process name only) reads the settings from the environment.
    monkeypatch.setenv("LOCKN_TUNE_LOG_JSON", "0")
    configure_logging("supervisor", stream=log_capture.buf)
    structlog.get_logger("tests").info("plain.line", step=3)
    last = log_capture.buf.getvalue().splitlines()[-1]
    assert "plain.line" in last and "step=3" in last and "supervisor" in last


async def test_workflow_logger_lines_carry_the_run(temporal_env, log_capture):
    log_capture.start("worker_cpu")
    queue = f"logs-{uuid.uuid4().hex[:8]}"
    run_id = f"run_{uuid.uuid4().hex[:8]}"
    async with Worker(temporal_env.client, task_queue=queue, workflows=[LogsOnce], workflow_runner=workflow_runner()):
        assert await temporal_env.client.execute_workflow(LogsOnce.run, "hello", id=run_id, task_queue=queue) == "hello"
    notes = [line for line in log_capture.lines() if line["event"].startswith("workflow.note")]
    assert len(notes) == 1, log_capture.buf.getvalue()
    note = notes[0]
    assert note["event"] == "workflow.note hello"  # Temporal's info dict is in the keys, not on the message
    assert note["run_id"] == note["workflow_id"] == run_id
    assert note["workflow_type"] == "LogsOnce" and note["task_queue"] == queue
    assert note["process"] == "worker_cpu" and note["temporal_run_id"]
