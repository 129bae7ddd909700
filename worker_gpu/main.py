"""worker_gpu: runs evaluate and train_chunk, one at a time on the GPU it is pinned to
(CUDA_VISIBLE_DEVICES), or on the CPU where there is no GPU (dev and CI); and answers
inspect_hardware on its own light queue (LOCKN_TUNE_GPU_TASK_QUEUE + "-hardware") meanwhile.

Run: `python -m worker_gpu.main` (or let `lockn-tune up` start it).

Metrics: LOCKN_TUNE_WORKER_GPU_METRICS_PORT serves this worker's lockn_tune_* metrics (step
time, tokens/s, loss, checkpoint time, GPU memory) and LOCKN_TUNE_SDK_METRICS_PORT + 1 the
Temporal SDK's temporal_* ones, both on LOCKN_TUNE_API_HOST (127.0.0.1 unless a deployment
opens it up, e.g. 0.0.0.0 in a container).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, closing
from datetime import timedelta

import structlog
from opentelemetry.trace import TracerProvider
from temporalio.client import Client
from temporalio.worker import Worker

from worker_gpu.activities import GpuActivities
from runtime import metrics
from runtime.logs import configure_logging
from runtime.telemetry import configure_tracing
from runtime.temporal import ActivityTelemetry, connect, sdk_runtime
from schemas.settings import Settings, hardware_task_queue_for
from store.blocking import BlockingDatabase
from store.open_store import open_store

log = structlog.get_logger(__name__)


class GpuWorker:
    """The training worker on the GPU queue (one activity at a time) and, beside it, a light
    worker on the hardware queue that only answers inspect_hardware, on its own threads, so
    hardware reports and dry runs never wait behind training. `async with` runs both, and
    frees the base model kept loaded between chunks (release_models) once both have stopped."""

    def __init__(
        self, training: Worker, hardware: Worker, hardware_executor: ThreadPoolExecutor, release_models: Callable[[], None]
    ):
        self.training, self.hardware = training, hardware
        self._hardware_executor = hardware_executor
        self._release_models = release_models
        self._stack: AsyncExitStack | None = None

    @property
    def task_queue(self) -> str:
        return self.training.task_queue

    async def __aenter__(self) -> "GpuWorker":
        async with AsyncExitStack() as stack:
            stack.callback(self._release_models)
            stack.callback(self._hardware_executor.shutdown, wait=False)
            await stack.enter_async_context(self.hardware)
            await stack.enter_async_context(self.training)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(*exc)


HARDWARE_SLOTS = 2  # inspect_hardware is quick; two answer at once while the GPU trains


def build_worker(
    client: Client, settings: Settings, executor: ThreadPoolExecutor, db: BlockingDatabase, task_queue: str | None = None
) -> GpuWorker:
    """The workers for settings' queues (GPU and hardware); activities write to db (the caller
    closes it). executor runs the GPU activities; the hardware worker brings its own threads."""
    activities = GpuActivities(settings, db, open_store(settings))
    gpu_queue = task_queue or settings.gpu_task_queue
    training = Worker(
        client,
        task_queue=gpu_queue,
        # inspect_hardware stays here too: runs started before the hardware queue ask for it here.
        activities=activities.all(),
        activity_executor=executor,
        max_concurrent_activities=1,
        # Heartbeats reach the server (and bring back cancel requests) every few seconds,
        # not at the SDK's default throttle of most of the heartbeat timeout.
        max_heartbeat_throttle_interval=timedelta(seconds=settings.heartbeat_every_s),
        default_heartbeat_throttle_interval=timedelta(seconds=settings.heartbeat_every_s),
        # Long enough for a chunk to finish its step and commit a checkpoint.
        graceful_shutdown_timeout=timedelta(seconds=120),
        interceptors=[ActivityTelemetry()],
    )
    hardware_executor = ThreadPoolExecutor(max_workers=HARDWARE_SLOTS, thread_name_prefix="gpu-hardware")
    hardware = Worker(
        client,
        task_queue=hardware_task_queue_for(gpu_queue),
        activities=[activities.inspect_hardware],
        activity_executor=hardware_executor,
        max_concurrent_activities=HARDWARE_SLOTS,
        graceful_shutdown_timeout=timedelta(seconds=10),
        interceptors=[ActivityTelemetry()],
    )
    return GpuWorker(training, hardware, hardware_executor, activities.base_models.release)


def sdk_metrics_port(settings: Settings) -> int | None:
    """worker_cpu takes LOCKN_TUNE_SDK_METRICS_PORT, worker_gpu the port after it."""
    return None if settings.sdk_metrics_port is None else settings.sdk_metrics_port + 1


@asynccontextmanager
async def running(settings: Settings, tracer_provider: TracerProvider | None = None) -> AsyncIterator[GpuWorker]:
    """worker_gpu polling its queues (GPU and hardware), with its metrics endpoints, until the block ends."""
    client = await connect(
        settings, tracer_provider=tracer_provider, runtime=sdk_runtime(settings.api_host, sdk_metrics_port(settings))
    )
    with (
        metrics.serving(settings.worker_gpu_metrics_port, settings.api_host, "LOCKN_TUNE_WORKER_GPU_METRICS_PORT"),
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpu-activity") as executor,
        closing(BlockingDatabase(settings.db_url)) as db,
    ):
        async with build_worker(client, settings, executor, db) as worker:
            yield worker


async def serve(settings: Settings) -> None:
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu (no GPU found)"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings):
        log.info(
            "worker_gpu.started", task_queue=settings.gpu_task_queue, hardware_task_queue=settings.hardware_task_queue,
            device=device, pid=os.getpid(),
            metrics_port=settings.worker_gpu_metrics_port, sdk_metrics_port=sdk_metrics_port(settings),
        )
        await stop.wait()
        log.info("worker_gpu.stopping", note="the running chunk checkpoints before exit")
    log.info("worker_gpu.stopped")


def main() -> None:
    settings = Settings()
    configure_logging("worker_gpu", settings)
    provider = configure_tracing("worker_gpu", settings)
    try:
        asyncio.run(serve(settings))
    finally:
        provider.shutdown()  # flushes spans still batched for the collector


if __name__ == "__main__":
    main()
