"""Prometheus metrics of the API and the workers, and the endpoints that serve them.

Each process exposes prometheus-client's default registry: the API at `GET /metrics`,
each worker on its own port (`LOCKN_TUNE_WORKER_CPU_METRICS_PORT`,
`LOCKN_TUNE_WORKER_GPU_METRICS_PORT`). The Temporal SDK's own metrics (`temporal_*`) are
served separately by the SDK's runtime on `LOCKN_TUNE_SDK_METRICS_PORT` (+1 for worker_gpu).

Metrics are module-level, as prometheus-client intends: one registry per process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from schemas.run_state import RunState

# Training steps of the tiny test models take milliseconds, those of 70B models tens of seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

RUNS = Gauge("lockn_tune_runs", "Runs by state, read from the metadata DB when scraped (API).", ["state"])
HTTP_REQUEST_DURATION = Histogram(
    "lockn_tune_http_request_duration_seconds",
    "API request duration, by method, route template and status code.",
    ["method", "route", "status"],
)
ACTIVITY_QUEUE_LATENCY = Histogram(
    "lockn_tune_activity_queue_latency_seconds",
    "From an activity attempt being scheduled to a worker starting it: how long work waits for a worker.",
    ["activity", "task_queue"],
    buckets=SLOW_BUCKETS,
)
ACTIVITY_DURATION = Histogram(
    "lockn_tune_activity_duration_seconds",
    "Activity execution time on this worker, by outcome (completed, failed, cancelled).",
    ["activity", "outcome"],
    buckets=SLOW_BUCKETS,
)
TRAIN_STEP = Histogram("lockn_tune_train_step_seconds", "Time of one optimizer step.", buckets=STEP_BUCKETS)
TRAIN_TOKENS_PER_SECOND = Gauge(
    "lockn_tune_train_tokens_per_second", "Tokens (prompt and answer, no padding) per second in the last step.", ["run_id"]
)
TRAIN_LOSS = Gauge("lockn_tune_train_loss", "Training loss of the last step.", ["run_id"])
TRAIN_STEPS = Counter("lockn_tune_train_steps_total", "Optimizer steps trained on this worker.")
CHECKPOINT_COMMIT = Histogram(
    "lockn_tune_checkpoint_commit_seconds",
    "Writing a checkpoint and committing it to the artifact store (manifest last).",
    buckets=SLOW_BUCKETS,
)
GPU_MEMORY = Gauge(
    "lockn_tune_gpu_memory_bytes",
    "CUDA memory held by training: allocated, reserved by the caching allocator, peak allocated.",
    ["device", "kind"],
)

# The names scrapes show (counters get `_total`): what dashboards and alerts may query.
METRIC_NAMES: frozenset[str] = frozenset(
    {
        "lockn_tune_runs",
        "lockn_tune_http_request_duration_seconds",
        "lockn_tune_activity_queue_latency_seconds",
        "lockn_tune_activity_duration_seconds",
        "lockn_tune_train_step_seconds",
        "lockn_tune_train_tokens_per_second",
        "lockn_tune_train_loss",
        "lockn_tune_train_steps_total",
        "lockn_tune_checkpoint_commit_seconds",
        "lockn_tune_gpu_memory_bytes",
    }
)

UNMATCHED_ROUTE = "<unmatched>"
KNOWN_STATES = frozenset(state.value for state in RunState)


def set_run_counts(counts: dict[str, int]) -> None:
    """Runs by state, every state present (0 when none), so a drained state reads 0 rather than its last count."""
    for state in RunState:
        RUNS.labels(state=state.value).set(counts.get(state.value, 0))
    for state, n in counts.items():
        if state not in KNOWN_STATES:
            RUNS.labels(state=state).set(n)


def render() -> tuple[bytes, str]:
    """The default registry in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@contextlib.contextmanager
def serving(port: int | None, host: str, setting: str = "the metrics port setting") -> Iterator[None]:
    """Serve /metrics on host:port while the block runs; nothing when port is None."""
    if port is None:
        yield
        return
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); another process holds the port: "
            f"stop it or choose another port with {setting}"
        ) from None
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# Training

_runs_lock = threading.Lock()
# Chunks training now in this process, by run: like the registry, one per process. A process
# may host several GPU workers (one per GPU, or the tests' stacks), each training its own run.
_training_now: dict[str, int] = {}


@contextlib.contextmanager
def training(run_id: str) -> Iterator[None]:
    """A chunk of run_id trains on this worker while the block runs.

    On entry, the per-run series (loss, tokens/s) of runs that no chunk in this process trains
    now go, and so does their cardinality; series of runs training on the process's other
    workers stay. A finished run's series stay until the next chunk starts.
    """
    with _runs_lock:
        _training_now[run_id] = _training_now.get(run_id, 0) + 1
        for gauge in (TRAIN_LOSS, TRAIN_TOKENS_PER_SECOND):
            for metric in gauge.collect():
                for labels in {s.labels["run_id"] for s in metric.samples} - set(_training_now):
                    gauge.remove(labels)
    try:
        yield
    finally:
        with _runs_lock:
            _training_now[run_id] -= 1
            if _training_now[run_id] == 0:
                del _training_now[run_id]


def observe_step(run_id: str, loss: float, seconds: float, tokens: int) -> None:
    """One optimizer step of run_id: its time, loss and throughput."""
    TRAIN_STEP.observe(seconds)
    TRAIN_STEPS.inc()
    TRAIN_LOSS.labels(run_id=run_id).set(loss)
    if seconds > 0:
        TRAIN_TOKENS_PER_SECOND.labels(run_id=run_id).set(tokens / seconds)


def reset_gpu_peak(device) -> None:
    """Start counting peak CUDA memory afresh (per chunk); nothing for CPU devices."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def observe_gpu_memory(device) -> None:
    """CUDA memory of a torch device; nothing for CPU devices (no numbers are made up)."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    name = f"cuda:{index}"
    GPU_MEMORY.labels(device=name, kind="allocated").set(torch.cuda.memory_allocated(index))
    GPU_MEMORY.labels(device=name, kind="reserved").set(torch.cuda.memory_reserved(index))
    GPU_MEMORY.labels(device=name, kind="peak").set(torch.cuda.max_memory_allocated(index))


# API


class HttpRequestMetrics:
    """ASGI middleware: request duration by method, route template (not the raw path, whose ids
    would make a series per run) and status code. Requests no route matches count as one route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            HTTP_REQUEST_DURATION.labels(method=scope["method"], route=route, status=str(status)).observe(
                time.perf_counter() - started
            )
