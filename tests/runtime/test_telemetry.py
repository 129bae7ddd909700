"""Spans leave the process over OTLP/HTTP when a collector is configured, and quietly go
nowhere when none is."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from runtime.telemetry import tracer_provider, traces_url


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback that keeps what it is sent."""

    def __init__(self):
        self.requests: list[tuple[str, ExportTraceServiceRequest]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.requests.append((self.path, ExportTraceServiceRequest.FromString(body)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(b"")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_spans_reach_the_collector_with_the_service_name():
    collector = Collector()
    collector.thread.start()
    try:
        provider = tracer_provider("worker_gpu", collector.url)
        with provider.get_tracer("tests").start_as_current_span("train"):
            pass
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        collector.shutdown()
        collector.server_close()
    (path, request), = collector.requests
    assert path == "/v1/traces"
    resource = request.resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "lockn-tune-worker-gpu"
    assert [s.name for s in request.resource_spans[0].scope_spans[0].spans] == ["train"]


def test_no_endpoint_exports_nothing_and_raises_nothing():
    provider = tracer_provider("api", None)
    with provider.get_tracer("tests").start_as_current_span("request") as span:
        assert span.get_span_context().is_valid  # ids still exist, for log lines
    assert provider.force_flush(1000)
    provider.shutdown()


def test_traces_url():
    assert traces_url("http://otel-collector:4318") == "http://otel-collector:4318/v1/traces"
    assert traces_url("http://otel-collector:4318/v1/traces/") == "http://otel-collector:4318/v1/traces"
