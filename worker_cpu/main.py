"""worker_cpu: hosts TuneLLM and the CPU activities (events, preflight, snapshot, publish).

Run: `python -m worker_cpu.main` (or let `lockn-tune up` start it).
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.cpu import CpuActivities
from runtime.logs import configure_logging
from runtime.temporal import connect
from schemas.settings import Settings
from store.artifacts import open_store
from store.db import Database
from workflows.preflight import InspectHardware, PreflightLLM
from workflows.tune_llm import TuneLLM

log = structlog.get_logger(__name__)


def build_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor, task_queue: str | None = None) -> Worker:
    activities = CpuActivities(settings, Database(settings.db_url), open_store(settings))
    return Worker(
        client,
        task_queue=task_queue or settings.cpu_task_queue,
        workflows=[TuneLLM, PreflightLLM, InspectHardware],
        activities=activities.all(),
        activity_executor=executor,
        max_concurrent_activities=executor._max_workers,
        graceful_shutdown_timeout=timedelta(seconds=30),
    )


async def serve(settings: Settings) -> None:
    client = await connect(settings)
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="cpu-activity") as executor:
        worker = build_worker(client, settings, executor)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("worker_cpu.started", task_queue=settings.cpu_task_queue, pid=os.getpid())
        async with worker:
            await stop.wait()
            log.info("worker_cpu.stopping")
    log.info("worker_cpu.stopped")


def main() -> None:
    configure_logging("worker_cpu")
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
