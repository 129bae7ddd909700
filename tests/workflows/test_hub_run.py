"""TuneLLM with a base model named by its Hub id, fetched from a loopback Hugging Face Hub
(tests/hub_server.py) serving the tiny model: the run trains on the stored model and names its
commit in the adapter's lineage, a second run asks the Hub for no file, a gated repo fails with
what to do, and a model-matrix model too big for the worker is refused before any request.

Run: python -m pytest tests/workflows/test_hub_run.py -x -q
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.worker import Worker

from activities.hub_fetch import EVENT_KIND
from schemas.hardware import HardwareInfo
from schemas.run_state import RunState
from schemas.settings import hardware_task_queue_for
from store.blocking import BlockingDatabase
from store.layout import model_manifest_key
from store.open_store import open_store
from tests.conftest import Stack, in_process_stack, small_spec, stack_settings
from tests.hub_server import online_hub
from tests.workflows.test_tune_llm import run_to_end

REPO = "lockn-tests/tiny-llama"
# Short runs: what is tested is where the model comes from, not how well it learns.
STEPS = {"max_steps": 3}


@pytest.fixture
def hub(monkeypatch):
    with online_hub(monkeypatch) as server:
        yield server


def at_the_hub(tmp_path: Path, hub):
    return stack_settings(tmp_path / "home").model_copy(update={"hf_endpoint": hub.url})


@pytest_asyncio.fixture
async def hub_stack(temporal_env, tmp_path, hub):
    """Both workers in this process, pointed at the loopback Hub."""
    async with in_process_stack(temporal_env.client, at_the_hub(tmp_path, hub)) as s:
        yield s


def downloads(hub) -> list[str]:
    """File requests the Hub has seen (metadata requests are not downloads)."""
    return [r.path for r in hub.requests if "/resolve/" in r.path or r.path.startswith("/cdn/")]


async def test_a_hub_model_is_fetched_once_and_its_commit_is_in_the_lineage(hub_stack, hub, tiny_model, datasets):
    sha = hub.add_repo(REPO, tiny_model)
    spec = small_spec(tiny_model, datasets["instruction"], base_model=REPO, hyperparameters=STEPS)
    run, _ = await run_to_end(hub_stack, spec)

    assert run.state == RunState.succeeded.value, run.error
    assert downloads(hub), "the first run fetched the model's files"
    assert run.plan["base_model_revision"] == sha
    assert run.plan["base_model_manifest_key"] == model_manifest_key(REPO, sha)
    manifest = json.loads((Path(run.adapter_path) / "lockn-manifest.json").read_text())
    assert manifest["base_model"]["id"] == REPO
    assert manifest["base_model"]["revision"] == sha and manifest["base_model"]["source"] == "hub"
    fetch_keys = {e.key for e in hub_stack.db.events(run.id, kind=EVENT_KIND)}
    assert {f"model-fetch:{sha}:start", f"model-fetch:{sha}:100", f"model-fetch:{sha}:stored"} <= fetch_keys
    # Local-folder runs see no extra state: the fetch reports in events while the run is in preflight.
    states = [e.state for e in hub_stack.db.events(run.id) if e.kind == "state"]
    assert states[:3] == [RunState.queued.value, RunState.preflight.value, RunState.preparing_data.value]

    hub.requests.clear()
    again, _ = await run_to_end(hub_stack, spec)
    assert again.state == RunState.succeeded.value, again.error
    assert downloads(hub) == [], "the second run reads the model from the artifact store"
    assert again.plan["base_model_revision"] == sha
    assert [e.key for e in hub_stack.db.events(again.id, kind=EVENT_KIND)] == [f"model-fetch:{sha}:reused"]


async def test_a_gated_repo_fails_the_run_with_the_token_setting(hub_stack, hub, tiny_model, datasets):
    gated = "lockn-tests/gated-llama"
    hub.add_repo(gated, tiny_model, gated=True, tokens=("hf_accepted",))
    run, _ = await run_to_end(hub_stack, small_spec(tiny_model, datasets["instruction"], base_model=gated))
    assert run.state == RunState.failed.value
    assert "gated" in run.error and "accept its licence" in run.error and "LOCKN_TUNE_HF_TOKEN" in run.error
    # A user error: one attempt, which resolved main once, and no retry.
    assert sum(r.path.startswith(f"/api/models/{gated}/revision/main") for r in hub.requests) == 1
    states = [e.state for e in hub_stack.db.events(run.id) if e.kind == "state"]
    assert RunState.preparing_data.value not in states


@activity.defn(name="inspect_hardware")
async def a_20_gb_gpu() -> HardwareInfo:
    """A GPU worker's report without the GPU: 21 GB, of which training may plan for 18.9 GB."""
    return HardwareInfo(
        device="cuda", gpu_name="a 21 GB GPU", gpu_memory_bytes=21 * 10**9, bf16_supported=True,
        bitsandbytes_usable=True, cpu_count=8, disk_free_bytes=10**12,
    )


async def test_a_matrix_model_too_big_for_the_worker_is_refused_before_any_download(
    temporal_env, tmp_path, hub, datasets, tiny_model
):
    from worker_cpu.main import build_worker

    settings = at_the_hub(tmp_path, hub)
    client = temporal_env.client
    db = BlockingDatabase(settings.db_url)
    # worker_cpu as it is, and the GPU worker's hardware answer replaced: nothing here trains.
    hardware = Worker(client, task_queue=hardware_task_queue_for(settings.gpu_task_queue), activities=[a_20_gb_gpu])
    try:
        with ThreadPoolExecutor(4) as pool:
            async with build_worker(client, settings, pool, db), hardware:
                stack = Stack(client, settings, db, open_store(settings))
                spec = small_spec(tiny_model, datasets["instruction"], base_model="microsoft/phi-4", method="lora")
                run, _ = await run_to_end(stack, spec)
    finally:
        db.close()
    assert run.state == RunState.failed.value
    assert "'microsoft/phi-4' with method 'lora'" in run.error and "before downloading it" in run.error
    assert "the worker has 18.9 GB usable on cuda" in run.error and "use method 'qlora' (needs" in run.error
    assert hub.requests == [], "refused before the Hub was asked anything"
