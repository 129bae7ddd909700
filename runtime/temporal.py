"""The Temporal client every process uses: same address, namespace and data converter, with
tracing; and what every worker adds: log context and metrics per activity, a sandbox that
lets OpenTelemetry through, and optionally the SDK's own Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

import structlog
from opentelemetry import trace
from opentelemetry.trace import TracerProvider
from temporalio import activity
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import CancelledError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from runtime import metrics
from schemas.settings import Settings

log = structlog.get_logger(__name__)

TRACER_NAME = "lockn-tune"


async def connect(
    settings: Settings, *, tracer_provider: TracerProvider | None = None, runtime: Runtime | None = None
) -> Client:
    """A client with the pydantic data converter and Temporal's tracing interceptor.

    Workers built from this client trace too (workflow and activity spans join the trace of
    whoever started the run). tracer_provider defaults to OTel's global one (a no-op until
    `runtime.telemetry.configure_tracing` installs one); runtime defaults to the SDK's
    (pass `sdk_runtime(...)` for the SDK's Prometheus metrics).
    """
    provider = tracer_provider or trace.get_tracer_provider()
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor(provider.get_tracer(TRACER_NAME))],
        runtime=runtime,
    )


def sdk_runtime(host: str, port: int | None) -> Runtime | None:
    """A Temporal runtime whose metrics (temporal_*: task latencies, slots, polls, failures)
    Prometheus scrapes at http://host:port/metrics; None (the SDK's default runtime) without a port."""
    if port is None:
        return None
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"{host}:{port}")))
    except ValueError as exc:  # the SDK reports a taken port this way
        raise RuntimeError(
            f"cannot serve Temporal SDK metrics on {host}:{port} ({exc}); another process holds the port: stop it "
            "or choose another LOCKN_TUNE_SDK_METRICS_PORT (worker_cpu binds it, worker_gpu the port after it)"
        ) from None


def workflow_runner() -> SandboxedWorkflowRunner:
    """The default sandbox, with OpenTelemetry passed through: the tracing interceptor's
    workflow side must see the same context module as the worker around it."""
    return SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("opentelemetry"))


class ActivityTelemetry(Interceptor):
    """Worker interceptor: for each activity attempt, binds the log context (run_id, workflow_id,
    activity, attempt, task_queue) and records queue latency and duration.

    The log context is bound in the activity's own task; the SDK runs sync activities in a
    copy of that context on the executor thread, so their lines carry it too.
    """

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityTelemetryInbound(next)


class _ActivityTelemetryInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput):
        info = activity.info()
        # Both times are the server's, so worker clock skew does not enter.
        waited = max(0.0, (info.started_time - info.current_attempt_scheduled_time).total_seconds())
        metrics.ACTIVITY_QUEUE_LATENCY.labels(activity=info.activity_type, task_queue=info.task_queue).observe(waited)
        with structlog.contextvars.bound_contextvars(
            run_id=info.workflow_id,
            workflow_id=info.workflow_id,
            activity=info.activity_type,
            attempt=info.attempt,
            task_queue=info.task_queue,
        ):
            log.info("activity.started", queued_s=round(waited, 3))
            started = time.monotonic()
            outcome, error = "failed", None
            try:
                result = await super().execute_activity(input)
                outcome = "completed"
                return result
            except (CancelledError, asyncio.CancelledError):
                outcome = "cancelled"
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                seconds = time.monotonic() - started
                metrics.ACTIVITY_DURATION.labels(activity=info.activity_type, outcome=outcome).observe(seconds)
                if error is None:
                    log.info(f"activity.{outcome}", seconds=round(seconds, 3))
                else:
                    log.warning("activity.failed", seconds=round(seconds, 3), error=error[:500])
