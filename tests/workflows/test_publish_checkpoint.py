"""A cancelled run's newest checkpoint can be published as a partial adapter, and loaded.

Real stack: the Temporal dev server, both workers in process, real training on the tiny
model, real HTTP through the app, and peft loading the adapter onto the tiny base model.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/workflows/test_publish_checkpoint.py`
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

from store.checkpoints import committed_steps
from tests.api.test_api import api, wait_for  # noqa: F401 - the fixture
from tests.conftest import small_spec


async def test_cancelled_run_publishes_its_last_checkpoint_and_peft_loads_it(api, stack, tiny_model, datasets):
    spec = small_spec(tiny_model, datasets["instruction"], hyperparameters={"max_steps": 2000}, checkpoint_every_steps=4)
    run = (await api.post("/v1/runs", json=spec.model_dump(mode="json"))).json()
    rid = run["id"]
    for _ in range(1200):
        if committed_steps(stack.store, rid):
            break
        state = (await api.get(f"/v1/runs/{rid}")).json()
        assert state["state"] not in ("failed", "cancelled"), state["error"]
        await asyncio.sleep(0.1)
    assert committed_steps(stack.store, rid), "no checkpoint was committed"

    early = await api.post(f"/v1/runs/{rid}/publish-checkpoint")
    assert early.status_code == 409 and "still training" in early.json()["detail"], early.text

    await api.post(f"/v1/runs/{rid}/cancel")
    done = await wait_for(api, rid, lambda r: r["state"] == "cancelled")
    newest = committed_steps(stack.store, rid)[0]

    r = await api.post(f"/v1/runs/{rid}/publish-checkpoint")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "published" and body["step"] == newest and body["total_steps"] == 2000
    artifact = body["artifact"]
    manifest = artifact["manifest"]
    assert manifest["partial"] == {"step": newest, "total_steps": 2000, "run_state": "cancelled", "reason": None}
    assert manifest["metrics"]["tuned_eval_loss"] is None
    assert manifest["metrics"]["baseline_eval_loss"] == done["baseline_eval_loss"]
    adapter = Path(artifact["path"])
    card = (adapter / "README.md").read_text()
    assert f"Partial adapter**: the checkpoint from step {newest} of 2000 of a cancelled run" in card
    assert "| with this adapter | not measured | not measured |" in card
    on_disk = json.loads((adapter / "lockn-manifest.json").read_text())
    assert on_disk["partial"]["step"] == newest and on_disk["parent"]["step"] == newest

    # The run lists it, and asking again answers the same artifact.
    assert [a["sha256"] for a in (await api.get(f"/v1/runs/{rid}")).json()["artifacts"]] == [artifact["sha256"]]
    again = await api.post(f"/v1/runs/{rid}/publish-checkpoint")
    assert again.status_code == 200 and again.json()["artifact"]["sha256"] == artifact["sha256"]

    # peft loads it onto the tiny base model, and it changes what the model computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the adapter's LoRA weights did nothing"


async def test_publish_checkpoint_refuses_runs_without_a_partial_adapter_to_give(api, stack, tiny_model, datasets):
    # Cancelled before it trained: no checkpoint.
    spec = small_spec(tiny_model, datasets["instruction"])
    early = (await api.post("/v1/runs", json=spec.model_dump(mode="json"))).json()
    await api.post(f"/v1/runs/{early['id']}/cancel")
    await wait_for(api, early["id"], lambda r: r["state"] == "cancelled")
    r = await api.post(f"/v1/runs/{early['id']}/publish-checkpoint")
    assert r.status_code == 409 and "no committed checkpoint" in r.json()["detail"], r.text

    # Succeeded: its adapter is already published.
    run = (await api.post("/v1/runs", json=spec.model_dump(mode="json"))).json()
    await wait_for(api, run["id"], lambda r: r["state"] == "succeeded")
    r = await api.post(f"/v1/runs/{run['id']}/publish-checkpoint")
    assert r.status_code == 409 and "already published" in r.json()["detail"]
    assert (await api.post("/v1/runs/run_nope/publish-checkpoint")).status_code == 404
