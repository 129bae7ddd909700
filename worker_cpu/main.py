"""worker_cpu: hosts TuneLLM and the CPU activities (events, preflight, snapshot, publish).

Run: `python -m worker_cpu.main` (or let `lockn-tune up` start it).

Metrics: LOCKN_TUNE_WORKER_CPU_METRICS_PORT serves this worker's lockn_tune_* metrics and
LOCKN_TUNE_SDK_METRICS_PORT the Temporal SDK's temporal_* ones, both on LOCKN_TUNE_API_HOST
(127.0.0.1 unless a deployment opens it up, e.g. 0.0.0.0 in a container).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from datetime import timedelta

import structlog
from opentelemetry.trace import TracerProvider
from temporalio.client import Client
from temporalio.worker import Worker

from activities.cpu import CpuActivities
from runtime import metrics
from runtime.logs import configure_logging
from runtime.telemetry import configure_tracing
from runtime.temporal import ActivityTelemetry, connect, sdk_runtime, workflow_runner
from schemas.settings import Settings
from store.blocking import BlockingDatabase
from store.open_store import open_store
from workflows.preflight import InspectHardware, PreflightLLM
from workflows.publish_checkpoint import PublishCheckpoint
from workflows.tune_llm import TuneLLM

log = structlog.get_logger(__name__)


def build_worker(
    client: Client, settings: Settings, executor: ThreadPoolExecutor, db: BlockingDatabase, task_queue: str | None = None
) -> Worker:
    """The worker for settings' queue; its activities write to db (the caller closes it)."""
    activities = CpuActivities(settings, db, open_store(settings))
    return Worker(
        client,
        task_queue=task_queue or settings.cpu_task_queue,
        workflows=[TuneLLM, PreflightLLM, InspectHardware, PublishCheckpoint],
        activities=activities.all(),
        activity_executor=executor,
        max_concurrent_activities=executor._max_workers,
        graceful_shutdown_timeout=timedelta(seconds=30),
        interceptors=[ActivityTelemetry()],
        workflow_runner=workflow_runner(),
    )


@asynccontextmanager
async def running(settings: Settings, tracer_provider: TracerProvider | None = None) -> AsyncIterator[Worker]:
    """worker_cpu polling its queue, with its metrics endpoints, until the block ends."""
    client = await connect(
        settings, tracer_provider=tracer_provider, runtime=sdk_runtime(settings.api_host, settings.sdk_metrics_port)
    )
    with (
        metrics.serving(settings.worker_cpu_metrics_port, settings.api_host, "LOCKN_TUNE_WORKER_CPU_METRICS_PORT"),
        ThreadPoolExecutor(max_workers=8, thread_name_prefix="cpu-activity") as executor,
        closing(BlockingDatabase(settings.db_url)) as db,
    ):
        async with build_worker(client, settings, executor, db) as worker:
            yield worker


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings):
        log.info(
            "worker_cpu.started", task_queue=settings.cpu_task_queue, pid=os.getpid(),
            metrics_port=settings.worker_cpu_metrics_port, sdk_metrics_port=settings.sdk_metrics_port,
        )
        await stop.wait()
        log.info("worker_cpu.stopping")
    log.info("worker_cpu.stopped")


def main() -> None:
    settings = Settings()
    configure_logging("worker_cpu", settings)
    provider = configure_tracing("worker_cpu", settings)
    try:
        asyncio.run(serve(settings))
    finally:
        provider.shutdown()  # flushes spans still batched for the collector


if __name__ == "__main__":
    main()
