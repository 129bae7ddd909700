"""GET /v1/models over the ASGI app: the model matrix with, per method, whether it fits the
training workers' hardware (asked of a real GPU worker through Temporal)."""

from __future__ import annotations

import httpx
import pytest_asyncio

from api.app import create_app
from api.routes.models import fit_verdict
from runtime.hardware import read_meminfo
from schemas.api_models import FitSettings
from schemas.hardware import HardwareInfo
from schemas.model_matrix import load_matrix
from schemas.run_spec import Method

GB = 10**9


def fake_hardware(**overrides) -> HardwareInfo:
    """A 16 GB GPU (a T4, a consumer card): too small for LoRA on a 7B model in bf16, enough for QLoRA."""
    values = dict(
        device="cuda", gpu_name="Fake 16GB", gpu_memory_bytes=16 * GB, compute_capability="8.6",
        bf16_supported=True, cuda_version="12.8", torch_version="2.11.0", bitsandbytes_usable=True,
        cpu_count=8, memory_total_bytes=32 * GB, memory_available_bytes=24 * GB, disk_free_bytes=100 * GB,
    )
    return HardwareInfo(**{**values, **overrides})


@pytest_asyncio.fixture
async def app(stack, temporal_env):
    settings = stack.settings.model_copy(update={"temporal_address": temporal_env.client.service_client.config.target_host})
    return create_app(settings)


@pytest_asyncio.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
        yield c


async def test_lists_every_model_with_fits_for_each_method_and_the_hardware(client):
    r = await client.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["id"] for m in body["models"]] == [m.id for m in load_matrix().models]

    hardware = body["hardware"]
    assert hardware["device"] in ("cuda", "cpu") and hardware["cpu_count"] >= 1
    assert hardware["disk_free_bytes"] > 0 and hardware["torch_version"]
    assert hardware["memory_total_bytes"] == read_meminfo()["MemTotal"]
    assert body["fit_settings"] == FitSettings().model_dump()

    for model in body["models"]:
        assert set(model["fits"]) == {"lora", "qlora"}, model["id"]
        for method, verdict in model["fits"].items():
            assert verdict["fits"] in (True, False, None) and verdict["reason"], (model["id"], method)
            if method in model["methods"] and verdict["fits"] is not None:
                assert verdict["estimate_bytes"] > 0 and verdict["available_bytes"] > 0, (model["id"], method)
    tts = next(m for m in body["models"] if m["id"] == "Qwen/Qwen3-TTS-12Hz-0.6B-Base")
    assert tts["kind"] == "tts" and tts["fits"]["qlora"]["fits"] is False
    assert "not offered" in tts["fits"]["qlora"]["reason"]

    paths = (await client.get("/openapi.json")).json()["paths"]
    assert paths["/v1/models"]["get"]["tags"] == ["models"] and "/v1/models/{model_id}" in paths


async def test_a_7b_model_fits_a_small_gpu_with_qlora_but_not_lora(app, client):
    app.state.hardware = fake_hardware()
    r = await client.get("/v1/models/Qwen/Qwen2.5-7B-Instruct")
    assert r.status_code == 200, r.text
    fits = r.json()["fits"]
    assert fits["lora"]["fits"] is False, fits["lora"]
    assert fits["qlora"]["fits"] is True, fits["qlora"]
    assert fits["qlora"]["estimate_bytes"] < fits["qlora"]["available_bytes"] < fits["lora"]["estimate_bytes"]
    assert fits["lora"]["available_bytes"] < 16 * GB  # preflight's headroom is kept
    assert "does not fit" in fits["lora"]["reason"] and "bfloat16" in fits["lora"]["reason"]

    listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert listed["Qwen/Qwen2.5-7B-Instruct"]["fits"] == fits
    assert listed["HuggingFaceTB/SmolLM2-135M-Instruct"]["fits"]["lora"]["fits"] is True
    assert (await client.get("/v1/models")).json()["hardware"]["gpu_name"] == "Fake 16GB"


async def test_qlora_does_not_fit_where_bitsandbytes_does_not_load(app, client):
    app.state.hardware = fake_hardware(bitsandbytes_usable=False)
    fits = (await client.get("/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct")).json()["fits"]
    assert fits["lora"]["fits"] is True
    assert fits["qlora"]["fits"] is False and "bitsandbytes" in fits["qlora"]["reason"]


async def test_get_one_model_and_404(client):
    r = await client.get("/v1/models/google/gemma-3-4b-it")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["architecture"] == "Gemma3ForConditionalGeneration" and body["export"] == {"gguf": True, "ollama": True}
    assert set(body["fits"]) == {"lora", "qlora"}

    missing = await client.get("/v1/models/acme/NotAModel-7B")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        "model 'acme/NotAModel-7B' is not in the model matrix; GET /v1/models lists the supported models"
    )


def test_fit_verdict_with_an_injected_estimator():
    entry = load_matrix().get("mistralai/Mistral-7B-Instruct-v0.3")
    cpu = fake_hardware(device="cpu", gpu_name=None, gpu_memory_bytes=None, bf16_supported=False,
                        memory_available_bytes=10 * GB)
    calls = []

    def estimate(entry, *, method, settings, dtype, device):
        calls.append((method, dtype, device, settings.seq_len))
        return {"lora": 9 * GB, "qlora": 3 * GB}[method]

    lora = fit_verdict(entry, Method.lora, cpu, estimate)
    qlora = fit_verdict(entry, Method.qlora, cpu, estimate)
    assert (lora.fits, lora.estimate_bytes, lora.available_bytes) == (False, 9 * GB, 8 * GB)  # 80% of MemAvailable
    assert (qlora.fits, qlora.estimate_bytes) == (True, 3 * GB)
    assert calls == [("lora", "float32", "cpu", 1024), ("qlora", "float32", "cpu", 1024)]

    tts = load_matrix().get("Qwen/Qwen3-TTS-12Hz-1.7B-Base")
    assert fit_verdict(tts, Method.qlora, cpu, estimate).fits is False  # not offered for TTS


async def test_without_a_gpu_worker_models_and_dry_runs_say_so_at_once(temporal_env, tmp_path, tiny_model, datasets):
    """Only worker_cpu is up: the answer is an immediate 503 naming the queue and how to start worker_gpu."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from store.blocking import BlockingDatabase
    from tests.conftest import small_spec, stack_settings
    from worker_cpu.main import build_worker as cpu_worker

    settings = stack_settings(tmp_path / "home").model_copy(
        update={"temporal_address": temporal_env.client.service_client.config.target_host}
    )
    db = BlockingDatabase(settings.db_url)
    try:
        with ThreadPoolExecutor(4) as pool:
            async with cpu_worker(temporal_env.client, settings, pool, db):
                app = create_app(settings)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as api:
                    started = time.monotonic()
                    r = await api.get("/v1/models")
                    seconds = time.monotonic() - started
                    assert r.status_code == 503, r.text
                    assert seconds < 5, f"took {seconds:.1f} s to say no GPU worker is up"
                    detail = r.json()["detail"]
                    assert detail.startswith("no GPU worker is running")
                    assert settings.hardware_task_queue in detail and "worker_gpu" in detail and "lockn-tune up" in detail

                    ds = (await api.post("/v1/datasets", files={"file": ("i.jsonl", datasets["instruction"].read_bytes())},
                                         params={"project": "tests"})).json()
                    started = time.monotonic()
                    r = await api.post("/v1/preflight", json=small_spec(tiny_model, ds["id"]).model_dump(mode="json"))
                    seconds = time.monotonic() - started
                    assert r.status_code == 503, r.text
                    assert seconds < 5 and r.json()["detail"] == detail
    finally:
        db.close()
