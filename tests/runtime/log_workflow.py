"""A workflow that only logs, for checking what workflow.logger lines carry (and that logging
from inside the sandbox works)."""

from __future__ import annotations

from temporalio import workflow


@workflow.defn(name="LogsOnce")
class LogsOnce:
    @workflow.run
    async def run(self, note: str) -> str:
        workflow.logger.info("workflow.note %s", note)
        return note
