"""worker_gpu: runs evaluate and train_chunk, one at a time on the GPU it is pinned to
(CUDA_VISIBLE_DEVICES), or on the CPU where there is no GPU (dev and CI).

Run: `python -m worker_gpu.main` (or let `lockn-tune up` start it).
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

from activities.gpu import GpuActivities
from runtime.logs import configure_logging
from runtime.temporal import connect
from schemas.settings import Settings
from store.artifacts import open_store
from store.db import Database

log = structlog.get_logger(__name__)


def build_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor, task_queue: str | None = None) -> Worker:
    activities = GpuActivities(settings, Database(settings.db_url), open_store(settings))
    return Worker(
        client,
        task_queue=task_queue or settings.gpu_task_queue,
        activities=activities.all(),
        activity_executor=executor,
        max_concurrent_activities=1,
        # Heartbeats reach the server (and bring back cancel requests) every few seconds,
        # not at the SDK's default throttle of most of the heartbeat timeout.
        max_heartbeat_throttle_interval=timedelta(seconds=settings.heartbeat_every_s),
        default_heartbeat_throttle_interval=timedelta(seconds=settings.heartbeat_every_s),
        # Long enough for a chunk to finish its step and commit a checkpoint.
        graceful_shutdown_timeout=timedelta(seconds=120),
    )


async def serve(settings: Settings) -> None:
    import torch

    client = await connect(settings)
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu (no GPU found)"
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpu-activity") as executor:
        worker = build_worker(client, settings, executor)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("worker_gpu.started", task_queue=settings.gpu_task_queue, device=device, pid=os.getpid())
        async with worker:
            await stop.wait()
            log.info("worker_gpu.stopping", note="the running chunk checkpoints before exit")
    log.info("worker_gpu.stopped")


def main() -> None:
    configure_logging("worker_gpu")
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
