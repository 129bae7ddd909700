"""Every API endpoint over real HTTP semantics (the ASGI app), a real Temporal dev server
and real training on a tiny model."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import pytest_asyncio

from api.app import create_app
from tests.conftest import small_spec


@asynccontextmanager
async def api_client(stack, temporal_env):
    settings = stack.settings.model_copy(
        update={
            "temporal_address": temporal_env.client.service_client.config.target_host,
            "max_upload_bytes": 64 * 1024,
        }
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        yield client


@pytest_asyncio.fixture
async def api(stack, temporal_env):
    async with api_client(stack, temporal_env) as client:
        yield client


@pytest_asyncio.fixture
async def any_api(any_stack, temporal_env):
    """The API once per backend: SQLite + filesystem store, PostgreSQL + S3 store."""
    async with api_client(any_stack, temporal_env) as client:
        yield client


async def wait_for(api, run_id, predicate, timeout=120):
    for _ in range(int(timeout * 10)):
        run = (await api.get(f"/v1/runs/{run_id}")).json()
        if predicate(run):
            return run
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} never got there: {run['state']} {run['error']}")


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


async def test_health_and_docs(api):
    r = await api.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok", "temporal": "ok"}
    assert (await api.get("/docs")).status_code == 200
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path in ("/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/events", "/v1/datasets", "/healthz"):
        assert path in paths
    # The stream is text/event-stream; its errors (404, 422, ...) are JSON like every route's.
    answers = paths["/v1/runs/{run_id}/events"]["get"]["responses"]
    assert {code: list(a["content"]) for code, a in answers.items()} == {
        code: ["text/event-stream" if code == "200" else "application/json"] for code in answers
    }


async def test_dataset_upload_multipart_and_raw(api, datasets):
    data = datasets["chat"].read_bytes()
    r = await api.post("/v1/datasets", files={"file": ("../../etc/chat.jsonl", data)}, params={"project": "tests"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("ds_") and body["name"] == "chat.jsonl"
    assert body["shape"] == "chat" and body["valid_rows"] == body["total_rows"] == 120
    import hashlib

    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert (await api.get(f"/v1/datasets/{body['id']}")).json()["sha256"] == body["sha256"]

    raw = await api.post("/v1/datasets", content=datasets["completion"].read_bytes(), params={"name": "c.jsonl"},
                         headers={"content-type": "application/x-ndjson"})
    assert raw.status_code == 201 and raw.json()["shape"] == "completion"
    assert (await api.get("/v1/datasets/ds_missing")).status_code == 404


async def test_dataset_upload_refusals(api):
    bad = b'{"instruction": "a"}\n{"oops": 1}\nnot json\n'
    r = await api.post("/v1/datasets", files={"file": ("bad.jsonl", bad)})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "no usable rows in bad.jsonl" in detail["message"]
    assert [p["line"] for p in detail["report"]["problems"]] == [1, 2, 3]

    huge = b'{"prompt": "p", "completion": "c"}\n' * 5000  # ~175 KB, over the 64 KiB limit of this app
    r = await api.post("/v1/datasets", files={"file": ("huge.jsonl", huge)})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    async def chunks():  # no Content-Length: the limit applies while the body streams
        for _ in range(100):
            yield b'{"prompt": "p", "completion": "c"}\n' * 40

    r = await api.post("/v1/datasets", content=chunks(), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 413


async def test_run_lifecycle_over_http(any_api, tiny_model, datasets):
    api = any_api
    ds = (await api.post("/v1/datasets", files={"file": ("i.jsonl", datasets["instruction"].read_bytes())},
                         params={"project": "tests"})).json()
    spec = small_spec(tiny_model, ds["id"]).model_dump(mode="json")
    r = await api.post("/v1/runs", json=spec)
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["state"] == "queued" and run["dataset"] == ds["id"]
    assert run["temporal_ui_url"].endswith(f"/workflows/{run['id']}")

    stream = await api.get(f"/v1/runs/{run['id']}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(stream.text)
    states = [d["state"] for kind, d in events if kind == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded"
    progress = [d for kind, d in events if kind == "progress"]
    assert progress and progress[-1]["step"] == 24 and progress[-1]["data"]["loss"] > 0
    assert events[-1] == ("end", {"state": "succeeded"})

    # Resuming the stream after the last state event gives only what came after it.
    last_state_id = [d["id"] for kind, d in events if kind == "state"][-2]
    later = parse_sse((await api.get(f"/v1/runs/{run['id']}/events", headers={"Last-Event-ID": str(last_state_id)})).text)
    assert [d["state"] for k, d in later if k == "state"] == ["succeeded"]

    done = (await api.get(f"/v1/runs/{run['id']}")).json()
    assert done["state"] == "succeeded" and done["progress"] == 1.0
    assert done["tuned_eval_loss"] < done["baseline_eval_loss"]
    assert done["metrics"]["tuned"]["samples"]
    [adapter] = done["artifacts"]
    assert adapter["kind"] == "adapter" and adapter["manifest"]["dataset"]["sha256"] == ds["sha256"]

    listed = (await api.get("/v1/runs", params={"project": "tests", "state": "succeeded"})).json()["runs"]
    assert run["id"] in [r["id"] for r in listed]
    assert (await api.get("/v1/runs", params={"state": "failed"})).json()["runs"] == []
    assert (await api.post(f"/v1/runs/{run['id']}/cancel")).status_code == 409


async def test_invalid_specs_are_refused_with_the_field(api, tiny_model):
    r = await api.post("/v1/runs", json={"base_model": str(tiny_model), "dataset": "x.jsonl", "method": "full"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "method"]
    r = await api.post("/v1/runs", json={"base_model": str(tiny_model), "dataset": "x.jsonl", "hyperparameters": {"lr": 1}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "lr"
    r = await api.post("/v1/runs", json={"base_model": str(tiny_model), "dataset": "ds_nope"})
    assert r.status_code == 422 and "not found" in r.json()["detail"]
    r = await api.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert (await api.get("/v1/runs/run_nope")).status_code == 404
    assert (await api.get("/v1/runs/run_nope/events")).status_code == 404
    assert (await api.post("/v1/runs/run_nope/cancel")).status_code == 404


async def test_cancel_over_http(api, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 2000}, checkpoint_every_steps=1000)
    run = (await api.post("/v1/runs", json=spec.model_dump(mode="json"))).json()
    await wait_for(api, run["id"], lambda r: r["state"] == "training" and r["step"] >= 2)
    r = await api.post(f"/v1/runs/{run['id']}/cancel")
    assert r.status_code == 202
    done = await wait_for(api, run["id"], lambda r: r["state"] == "cancelled")
    assert done["step"] < 1000
    events = parse_sse((await api.get(f"/v1/runs/{run['id']}/events", params={"follow": "false"})).text)
    assert any(d.get("message") == "cancellation requested by local" for _, d in events)


async def test_temporal_down_gives_503_not_500(stack, tiny_model, datasets):
    settings = stack.settings.model_copy(update={"temporal_address": "127.0.0.1:1"})
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/healthz")).status_code == 503
        r = await client.post("/v1/runs", json=small_spec(tiny_model, datasets["chat"]).model_dump(mode="json"))
        assert r.status_code == 503 and "Temporal is not reachable" in r.json()["detail"]


async def test_preflight_dry_run_and_the_report_stored_on_a_run(api, tiny_model, datasets):
    ds = (await api.post("/v1/datasets", files={"file": ("i.jsonl", datasets["instruction"].read_bytes())},
                         params={"project": "tests"})).json()
    r = await api.post("/v1/preflight", json={"project": "tests", "base_model": str(tiny_model), "dataset": ds["id"],
                                                   "preset": "quick"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] and report["hardware"]["device"] == "cpu"
    assert report["plan"]["hyperparameters"]["lora_r"] == 8
    assert {d["field"] for d in report["defaults"]} >= {"epochs", "learning_rate", "micro_batch_size"}
    assert (await api.get("/v1/runs")).json()["runs"] == []  # a dry run starts nothing

    refused = await api.post("/v1/preflight", json={"project": "tests", "base_model": str(tiny_model),
                                                     "dataset": ds["id"], "hyperparameters": {"max_seq_len": 16}})
    assert refused.status_code == 200 and not refused.json()["ok"]
    assert "truncates 100% of rows" in refused.json()["errors"][0]

    run = (await api.post("/v1/runs", json=small_spec(tiny_model, ds["id"]).model_dump(mode="json"))).json()
    await wait_for(api, run["id"], lambda r: r["state"] == "succeeded")
    stored = (await api.get(f"/v1/runs/{run['id']}/preflight")).json()
    assert stored["ok"] and stored["plan"]["total_steps"] == 24
    assert (await api.get("/v1/runs/run_nope/preflight")).status_code == 404
