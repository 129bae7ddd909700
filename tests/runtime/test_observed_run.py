"""One real run started through the API, with both workers started the way their entry points
start them (metrics endpoints on loopback ports, the SDK's Prometheus runtime, tracing), then
what an operator sees of it: log lines, one trace, and the metrics endpoints."""

from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass

import httpx
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from runtime.metrics import METRIC_NAMES
from runtime.telemetry import tracer_provider
from runtime.temporal import connect
from schemas.settings import Settings
from tests.conftest import small_spec, stack_settings
from tests.runtime.conftest import LogCapture
from tests.stack_process import free_port
from worker_cpu.main import running as cpu_worker
from worker_gpu.main import running as gpu_worker

STEPS = 12


def free_port_pair() -> int:
    """A loopback port p with p+1 free too (the SDK metrics ports of worker_cpu and worker_gpu)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@dataclass
class ObservedRun:
    run: dict
    settings: Settings
    logs: list[dict]
    spans: list[ReadableSpan]
    api_metrics: str
    openapi_paths: set[str]
    worker_metrics: dict[str, str]  # worker_cpu, worker_gpu, sdk_cpu, sdk_gpu: text of each endpoint
    before: dict[str, str]  # api, worker_cpu, worker_gpu before the run: other tests in this process count too

    def grew(self, endpoint: str, name: str, **labels) -> float:
        after = self.api_metrics if endpoint == "api" else self.worker_metrics[endpoint]
        return (value(after, name, **labels) or 0) - (value(self.before[endpoint], name, **labels) or 0)


def samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def families(text: str) -> set[str]:
    # prometheus-client drops a counter's _total from its family name; the scraped series keep it.
    return {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels) -> float | None:
    for sample_name, sample_labels, v in samples(text):
        if sample_name == name and all(sample_labels.get(k) == w for k, w in labels.items()):
            return v
    return None


@pytest_asyncio.fixture(scope="module")
async def observed(temporal_env, tiny_model, datasets, tmp_path_factory):
    settings = stack_settings(tmp_path_factory.mktemp("observed") / "home").model_copy(
        update={
            "temporal_address": temporal_env.client.service_client.config.target_host,
            "worker_cpu_metrics_port": free_port(),
            "worker_gpu_metrics_port": free_port(),
            "sdk_metrics_port": free_port_pair(),
        }
    )
    # One provider per process, as in production, all exporting to one in-memory exporter.
    exporter = InMemorySpanExporter()
    providers = {}
    for process in ("api", "worker_cpu", "worker_gpu"):
        providers[process] = tracer_provider(process)
        providers[process].add_span_processor(SimpleSpanProcessor(exporter))

    app = create_app(settings, tracer_provider=providers["api"])
    app.state.temporal = await connect(settings, tracer_provider=providers["api"])
    logs = LogCapture().start()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(cpu_worker(settings, providers["worker_cpu"]))
        await stack.enter_async_context(gpu_worker(settings, providers["worker_gpu"]))
        api = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
        )
        async with httpx.AsyncClient(timeout=10) as http:
            before = {k: (await http.get(f"http://{settings.api_host}:{port}/metrics")).text
                      for k, port in (("worker_cpu", settings.worker_cpu_metrics_port),
                                      ("worker_gpu", settings.worker_gpu_metrics_port))}
        before["api"] = (await api.get("/metrics")).text
        spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": STEPS}, checkpoint_every_steps=6)
        r = await api.post("/v1/runs", json=spec.model_dump(mode="json"))
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        for _ in range(1800):
            run = (await api.get(f"/v1/runs/{run_id}")).json()
            if run["state"] in ("succeeded", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        assert run["state"] == "succeeded", run

        # Scrapes over real HTTP, as Prometheus would.
        async with httpx.AsyncClient(timeout=10) as http:
            host = settings.api_host
            endpoints = {
                "worker_cpu": settings.worker_cpu_metrics_port,
                "worker_gpu": settings.worker_gpu_metrics_port,
                "sdk_cpu": settings.sdk_metrics_port,
                "sdk_gpu": settings.sdk_metrics_port + 1,
            }
            worker_metrics = {k: (await http.get(f"http://{host}:{port}/metrics")).text for k, port in endpoints.items()}
        api_metrics = await api.get("/metrics")
        assert api_metrics.status_code == 200 and api_metrics.headers["content-type"].startswith("text/plain")
        openapi_paths = set((await api.get("/openapi.json")).json()["paths"])
    yield ObservedRun(
        run, settings, logs.lines(), list(exporter.get_finished_spans()), api_metrics.text, openapi_paths, worker_metrics, before
    )
    await app.state.db.close()


def test_activity_log_lines_carry_run_workflow_activity_and_attempt(observed):
    run_id = observed.run["id"]
    lines = [line for line in observed.logs if line.get("run_id") == run_id]
    # Logged from inside train_chunk on the GPU worker's thread pool: the context crossed into the thread.
    commits = [line for line in lines if line["event"] == "checkpoint.committed"]
    assert [c["step"] for c in commits] == [6, 12]
    for line in commits:
        assert line["workflow_id"] == run_id and line["activity"] == "train_chunk" and line["attempt"] == 1
        assert line["task_queue"] == observed.settings.gpu_task_queue
        assert line["trace_id"]  # and the trace to look it up in
    done = {(line["activity"], line["event"]) for line in lines if line["event"].startswith("activity.")}
    for activity in ("preflight", "snapshot_dataset", "evaluate", "train_chunk", "publish"):
        assert (activity, "activity.started") in done and (activity, "activity.completed") in done, activity
    # Lines outside any activity carry no run fields left behind by one.
    assert all("activity" not in line for line in observed.logs if line["event"] == "run.started")


def test_one_trace_from_the_request_to_the_activities(observed):
    run_id = observed.run["id"]
    [post] = [s for s in observed.spans if s.name == "POST /v1/runs" and s.kind.name == "SERVER"]
    trace = [s for s in observed.spans if s.context.trace_id == post.context.trace_id]
    services = {s.name: s.resource.attributes["service.name"] for s in trace}
    assert services["POST /v1/runs"] == "lockn-tune-api"
    assert services["StartWorkflow:TuneLLM"] == "lockn-tune-api"
    assert services["RunWorkflow:TuneLLM"] == "lockn-tune-worker-cpu"
    assert services["StartActivity:train_chunk"] == "lockn-tune-worker-cpu"
    assert services["RunActivity:preflight"] == "lockn-tune-worker-cpu"
    assert services["RunActivity:train_chunk"] == "lockn-tune-worker-gpu"
    assert services["RunActivity:publish"] == "lockn-tune-worker-cpu"
    assert not [s for s in observed.spans if "/metrics" in s.name]  # scrapes are not traced
    assert not [s for s in observed.spans if s.name.endswith((" http send", " http receive"))]  # one span per request
    by_id = {s.context.span_id: s for s in trace}
    assert len(by_id) == len(trace), "span ids repeat within the trace"
    [start] = [s for s in trace if s.name == "StartWorkflow:TuneLLM"]
    assert start.parent.span_id == post.context.span_id and start.attributes["temporalWorkflowID"] == run_id
    # Each chunk's RunActivity hangs under the workflow's StartActivity, which hangs under the run.
    for chunk in (s for s in trace if s.name == "RunActivity:train_chunk"):
        assert by_id[chunk.parent.span_id].name == "StartActivity:train_chunk"


def test_worker_metrics_show_training_checkpoints_and_queue_latency(observed):
    run_id = observed.run["id"]
    gpu = observed.worker_metrics["worker_gpu"]
    assert observed.grew("worker_gpu", "lockn_tune_train_step_seconds_count") == STEPS
    assert observed.grew("worker_gpu", "lockn_tune_train_steps_total") == STEPS
    assert value(gpu, "lockn_tune_train_loss", run_id=run_id) > 0
    assert value(gpu, "lockn_tune_train_tokens_per_second", run_id=run_id) > 0
    assert observed.grew("worker_gpu", "lockn_tune_checkpoint_commit_seconds_count") == 2  # steps 6 and 12
    assert value(gpu, "lockn_tune_activity_queue_latency_seconds_count", activity="train_chunk",
                 task_queue=observed.settings.gpu_task_queue) == 2
    assert observed.grew("worker_gpu", "lockn_tune_activity_duration_seconds_count", activity="train_chunk",
                         outcome="completed") == 2
    cpu = observed.worker_metrics["worker_cpu"]
    assert value(cpu, "lockn_tune_activity_queue_latency_seconds_count", activity="preflight",
                 task_queue=observed.settings.cpu_task_queue) == 1
    import torch

    if not torch.cuda.is_available():  # on CPU the gauge is declared but has no (made-up) samples
        assert value(gpu, "lockn_tune_gpu_memory_bytes") is None
    else:
        assert value(gpu, "lockn_tune_gpu_memory_bytes", kind="peak") > 0


def test_sdk_metrics_endpoints_show_temporal_series(observed):
    for name, queue in (("sdk_cpu", observed.settings.cpu_task_queue), ("sdk_gpu", observed.settings.gpu_task_queue)):
        series = samples(observed.worker_metrics[name])
        assert any(n.startswith("temporal_") and labels.get("task_queue") == queue for n, labels, _ in series), name
    gpu = observed.worker_metrics["sdk_gpu"]
    assert any(n.startswith("temporal_activity_execution_latency") and labels.get("activity_type") == "train_chunk"
               for n, labels, _ in samples(gpu))


def test_api_metrics_show_request_durations_and_runs_by_state(observed):
    text = observed.api_metrics
    assert observed.grew("api", "lockn_tune_http_request_duration_seconds_count", method="POST", route="/v1/runs",
                         status="201") == 1
    assert observed.grew("api", "lockn_tune_http_request_duration_seconds_count", method="GET",
                         route="/v1/runs/{run_id}", status="200") >= 1
    assert value(text, "lockn_tune_runs", state="succeeded") == 1
    assert value(text, "lockn_tune_runs", state="training") == 0
    assert "/metrics" not in observed.openapi_paths and "/v1/runs" in observed.openapi_paths
    # Every name a dashboard may query is served (the GPU gauge as a declared family on CPU).
    assert METRIC_NAMES <= families(text) | families(observed.worker_metrics["worker_gpu"])
