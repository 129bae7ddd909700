"""OpenTelemetry traces: one tracer provider per process, exported over OTLP/HTTP when
LOCKN_TUNE_OTLP_ENDPOINT is set (spans are dropped, quietly, when it is not).

A request that starts a run is one trace: the API's HTTP span, StartWorkflow (the API's
Temporal client), RunWorkflow and StartActivity (worker_cpu, as zero-length spans: the
workflow replays), RunActivity (the worker that ran it). Temporal carries the context in
headers (`runtime.temporal.connect` adds the tracing interceptor).

Tests pass their own provider (with an in-memory exporter) to `create_app` and
`runtime.temporal.connect`: OTel's global provider can be set only once per process.
"""

from __future__ import annotations

import secrets

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator

from schemas.settings import Settings

SERVICE_NAMES = {
    "api": "lockn-tune-api",
    "worker_cpu": "lockn-tune-worker-cpu",
    "worker_gpu": "lockn-tune-worker-gpu",
}
TRACES_PATH = "/v1/traces"


def service_name(process: str) -> str:
    return SERVICE_NAMES.get(process, f"lockn-tune-{process.replace('_', '-')}")


def traces_url(endpoint: str) -> str:
    """The collector's traces address: `http://collector:4318` means `http://collector:4318/v1/traces`."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class OsRandomIds(IdGenerator):
    """Span and trace ids from the OS's randomness. OTel's default draws on the `random`
    module's global state, which train_chunk rewinds on purpose when it restores a
    checkpoint's RNG states (exact resume): ids then repeated, and spans hung under the
    wrong parent."""

    def generate_span_id(self) -> int:
        return secrets.randbits(64) or 1

    def generate_trace_id(self) -> int:
        return secrets.randbits(128) or 1


def tracer_provider(process: str, otlp_endpoint: str | None = None) -> TracerProvider:
    """A provider naming this process (service.name), exporting in batches to otlp_endpoint if given."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name(process)}), id_generator=OsRandomIds()
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(otlp_endpoint))))
    return provider


def configure_tracing(process: str, settings: Settings) -> TracerProvider:
    """This process's provider, installed as OTel's global one.

    OTel allows one global provider per process: a second call (several apps in one test
    process) returns the provider already installed.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = tracer_provider(process, settings.otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider


def current_trace_ids() -> dict[str, str]:
    """trace_id and span_id of the current span (hex, as trace backends show them); empty outside one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
