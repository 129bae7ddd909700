"""publish writes a real model card, and a retry writes the same bytes.

A real run on the tiny model through the API; then `publish` is run again with the same
input, as Temporal does when a worker dies after the files are written.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/activities/test_publish.py`
"""

from __future__ import annotations

import re
from pathlib import Path

from activities.publish import publish_adapter
from schemas.activities import CheckpointRef, DatasetSnapshot, EvalResult, PublishInput, TrainingPlan
from tests.api.test_api import api, wait_for  # noqa: F401 - the fixture
from tests.conftest import small_spec


async def test_model_card_says_what_the_adapter_is_and_a_retry_rewrites_the_same_bytes(api, stack, tiny_model, datasets):
    ds = (await api.post("/v1/datasets", files={"file": ("i.jsonl", datasets["instruction"].read_bytes())},
                         params={"project": "tests"})).json()
    run = (await api.post("/v1/runs", json=small_spec(tiny_model, ds["id"]).model_dump(mode="json"))).json()
    done = await wait_for(api, run["id"], lambda r: r["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    [artifact] = done["artifacts"]
    adapter = Path(artifact["path"])
    card = (adapter / "README.md").read_text()
    manifest_bytes = (adapter / "lockn-manifest.json").read_bytes()

    # A retried publish (same input) writes byte-identical files.
    plan, snap = done["plan"], done["dataset_snapshot"]
    parent = artifact["manifest"]["parent"]
    metrics = done["metrics"]
    retry = PublishInput(
        run_id=run["id"],
        plan=TrainingPlan.model_validate(plan),
        snapshot=DatasetSnapshot.model_validate(snap),
        checkpoint=CheckpointRef(manifest_key=parent["key"], step=parent["step"], manifest_sha256=parent["sha256"]),
        baseline=EvalResult.model_validate(metrics["baseline"]),
        tuned=EvalResult.model_validate(metrics["tuned"]),
    )
    publish_adapter(retry, stack.db, stack.store)
    assert (adapter / "lockn-manifest.json").read_bytes() == manifest_bytes
    assert (adapter / "README.md").read_text() == card

    # Not PEFT's template: the base model, the data, the method, the numbers, how to load it.
    assert "[More Information Needed]" not in card
    assert f"base_model: \"{tiny_model}\"" in card
    assert f"revision: `{plan['base_model_revision']}` (sha256 of the local weight files)" in card
    assert f"dataset sha256: `{ds['sha256']}`" in card
    assert f"{snap['train_rows']} train / {snap['eval_rows']} eval rows" in card
    assert "| lora_r | 8 |" in card and "| learning_rate | 0.003 |" in card and "| total_steps | 24 |" in card
    assert f"| base model | {done['baseline_eval_loss']:.4f} |" in card
    assert f"| with this adapter | {done['tuned_eval_loss']:.4f} |" in card
    assert "Partial adapter" not in card

    # The card's own loading snippet works as written.
    [snippet] = re.findall(r"```python\n(.*?)```", card, re.S)
    scope: dict = {}
    exec(snippet, scope)
    assert "Peft" in type(scope["model"]).__name__
