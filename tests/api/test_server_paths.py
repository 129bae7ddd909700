"""Paths on the server that a request names: only those under the allowed roots are read.

Real HTTP through the app, the real stack (Temporal dev server, in-process workers) and
a secret file outside the roots whose marker must appear in no response and no log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import asynccontextmanager

import httpx
import pytest
import pytest_asyncio

from api.app import create_app
from api.routes.runs import start_run_workflow
from runtime.logs import configure_logging
from schemas.settings import Settings
from tests.conftest import in_process_stack, small_spec, stack_settings

MARKER = "SECRET-7f3a9c-DO-NOT-LEAK"
REFUSED = "outside the folders this server reads"


@pytest.fixture
def world(tmp_path, tiny_model, datasets):
    """Roots = the tiny model's folder and the datasets' folder (plus the home); a secret
    JSONL file and a copy of the model outside them, and ways to reach them from inside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jsonl"
    secret.write_text("".join(json.dumps({"instruction": f"{MARKER} {i}", "output": MARKER}) + "\n" for i in range(60)))
    model_copy = outside / "model"
    shutil.copytree(tiny_model, model_copy)
    data_root = datasets["instruction"].parent
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "link.jsonl").symlink_to(secret)
    (home / "data" / "model-link").symlink_to(model_copy)
    escape = os.path.join(str(data_root), "..", tmp_path.name, "outside", "secret.jsonl")
    model_escape = os.path.join(str(tiny_model.parent), "..", tmp_path.name, "outside", "model")
    roots = os.pathsep.join([str(tiny_model.parent), str(data_root)])
    return {
        "home": home, "roots": roots, "model": tiny_model, "data": datasets["instruction"],
        "datasets": {
            "plain": str(secret), "dotdot": escape, "symlink": str(home / "data" / "link.jsonl"),
            "proc": "/proc/self/environ",
        },
        "models": {"plain": str(model_copy), "dotdot": model_escape, "symlink": str(home / "data" / "model-link")},
    }


@pytest_asyncio.fixture
async def narrow(temporal_env, world):
    settings = stack_settings(world["home"]).model_copy(update={"allowed_roots": world["roots"]})
    async with in_process_stack(temporal_env.client, settings) as s:
        yield s


@asynccontextmanager
async def api_for(stack, temporal_env, log_buf):
    settings = stack.settings.model_copy(update={"temporal_address": temporal_env.client.service_client.config.target_host})
    app = create_app(settings)
    configure_logging("tests", Settings(log_json=True, log_level="DEBUG"), stream=log_buf)  # after the app's own
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
            yield c
    finally:
        configure_logging("tests", Settings(log_json=False))


def spec_body(world, dataset=None, base_model=None) -> dict:
    return small_spec(base_model or world["model"], dataset or world["data"]).model_dump(mode="json")


def assert_refused(r: httpx.Response, field: str) -> str:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str), detail
    assert detail.startswith(f"{field} ") and REFUSED in detail, detail
    assert "LOCKN_TUNE_ALLOWED_ROOTS" in detail and "--allow-dir" in detail
    if field in ("dataset", "eval_dataset"):
        assert "POST /v1/datasets" in detail and "lockn-tune tune" in detail
    return detail


def assert_nothing_leaked(texts: list[str]) -> None:
    for text in texts:
        assert MARKER not in text
        assert "PATH=" not in text  # /proc/self/environ's content


async def test_paths_outside_the_roots_are_refused_and_never_read(narrow, temporal_env, world, caplog):
    caplog.set_level(logging.DEBUG)
    buf = io.StringIO()
    bodies = []
    async with api_for(narrow, temporal_env, buf) as api:
        for path in world["datasets"].values():
            for route in ("/v1/preflight", "/v1/runs"):
                r = await api.post(route, json=spec_body(world, dataset=path))
                bodies.append(r.text)
                detail = assert_refused(r, "dataset")
                assert world["roots"].split(os.pathsep)[0] in detail, detail  # lists the allowed folders
        for path in world["models"].values():
            for route in ("/v1/preflight", "/v1/runs"):
                r = await api.post(route, json=spec_body(world, base_model=path))
                bodies.append(r.text)
                assert_refused(r, "base_model")
        for route in ("/v1/preflight", "/v1/runs"):  # a validation file follows the same rule
            r = await api.post(route, json={**spec_body(world), "eval_dataset": world["datasets"]["symlink"]})
            bodies.append(r.text)
            assert_refused(r, "eval_dataset")
        for field in ("dataset", "base_model"):  # not a path at all: refused, not a 500
            r = await api.post("/v1/runs", json={**spec_body(world), field: "/tmp/a\x00b"})
            assert r.status_code == 422 and "is not a usable path on the server" in r.json()["detail"], r.text
        runs = (await api.get("/v1/runs")).json()["runs"]
        assert runs == []  # nothing was started
        # Inside the roots everything still works, however the path is spelled.
        inside = os.path.join(str(world["data"].parent), ".", world["data"].name)
        ok = await api.post("/v1/preflight", json=spec_body(world, dataset=inside))
        assert ok.status_code == 200 and ok.json()["ok"], ok.text
    assert_nothing_leaked(bodies + [caplog.text, buf.getvalue()])


async def test_the_worker_refuses_too_when_the_api_is_bypassed(narrow, world, caplog):
    """A run started on Temporal directly (an operator's `temporal workflow start`, or an API
    with other settings) meets the same rule in worker_cpu: it fails with the refusal."""
    caplog.set_level(logging.DEBUG)
    for field, path in (("dataset", world["datasets"]["symlink"]), ("base_model", world["models"]["dotdot"])):
        spec = small_spec(
            path if field == "base_model" else world["model"], path if field == "dataset" else world["data"]
        )
        run_id = f"run_bypass_{field}"
        narrow.db.create_run(run_id, spec, created_by="operator")
        handle = await start_run_workflow(narrow.client, narrow.settings, run_id, spec)
        with pytest.raises(Exception):
            await handle.result()
        row = narrow.db.get_run(run_id)
        assert row.state == "failed" and row.error.startswith(f"{field} ") and REFUSED in row.error, row.error
        events = " ".join(json.dumps(e.data) + e.message for e in narrow.db.events(run_id))
        assert_nothing_leaked([row.error, events, caplog.text])
