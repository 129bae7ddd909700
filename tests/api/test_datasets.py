"""Datasets are content-addressed per project; they can be listed and deleted, but not from
under a run that still uses them. Real HTTP through the app, a real Temporal dev server and
real training on the tiny model.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/api/test_datasets.py`
"""

from __future__ import annotations

import hashlib

from tests.api.test_api import any_api, api, wait_for  # noqa: F401 - the fixtures
from tests.conftest import small_spec


async def upload(api, path, project="tests", name=None):
    params = {"project": project, **({"name": name} if name else {})}
    return await api.post("/v1/datasets", files={"file": (path.name, path.read_bytes())}, params=params)


def stored_dataset_files(stack) -> list[str]:
    return stack.store.list("datasets/sha256")


async def test_the_same_bytes_are_the_same_dataset_in_a_project_and_another_in_another(any_api, any_stack, datasets):
    """On both backends: SQLite + filesystem store, PostgreSQL + S3 store."""
    api, stack = any_api, any_stack
    first = await upload(api, datasets["chat"])
    again = await upload(api, datasets["chat"], name="renamed.jsonl")
    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["name"] == "chat.jsonl"  # the first upload named it
    # Raw bodies hash the same way as multipart ones.
    raw = await api.post("/v1/datasets", params={"project": "tests"}, content=datasets["chat"].read_bytes(),
                         headers={"content-type": "application/x-ndjson"})
    assert raw.status_code == 200 and raw.json()["id"] == first.json()["id"]

    other = await upload(api, datasets["chat"], project="elsewhere")
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert other.json()["sha256"] == first.json()["sha256"] == hashlib.sha256(datasets["chat"].read_bytes()).hexdigest()
    # One stored copy of the bytes for both projects.
    assert stored_dataset_files(stack) == [f"datasets/sha256/{first.json()['sha256']}.jsonl"]

    listed = (await api.get("/v1/datasets", params={"project": "tests"})).json()["datasets"]
    assert [d["id"] for d in listed] == [first.json()["id"]]
    assert listed[0]["total_rows"] == 120 and listed[0]["size_bytes"] == datasets["chat"].stat().st_size
    assert listed[0]["runs"] == [] and "report" not in listed[0]
    everything = (await api.get("/v1/datasets")).json()["datasets"]
    assert {d["project"] for d in everything} == {"tests", "elsewhere"}

    # Deleting one project's dataset keeps the bytes the other still holds; the last takes them.
    assert (await api.delete(f"/v1/datasets/{first.json()['id']}")).status_code == 204
    assert len(stored_dataset_files(stack)) == 1
    assert (await api.delete(f"/v1/datasets/{other.json()['id']}")).status_code == 204
    assert stored_dataset_files(stack) == []


async def test_delete_is_refused_while_a_run_uses_it_and_the_finished_run_keeps_its_snapshot(api, stack, tiny_model, datasets):
    ds = (await upload(api, datasets["instruction"])).json()
    kept = (await upload(api, datasets["instruction"], project="elsewhere")).json()
    spec = small_spec(tiny_model, ds["id"], hyperparameters={"max_steps": 2000}, checkpoint_every_steps=1000)
    run = (await api.post("/v1/runs", json=spec.model_dump(mode="json"))).json()
    await wait_for(api, run["id"], lambda r: r["state"] == "training")

    using = (await api.get(f"/v1/datasets/{ds['id']}")).json()["runs"]
    assert [(r["id"], r["state"]) for r in using] == [(run["id"], "training")]
    listed = (await api.get("/v1/datasets", params={"project": "tests"})).json()["datasets"]
    assert [r["id"] for r in listed[0]["runs"]] == [run["id"]]

    refused = await api.delete(f"/v1/datasets/{ds['id']}")
    assert refused.status_code == 409
    assert run["id"] in refused.json()["detail"] and "training" in refused.json()["detail"]
    assert (await api.get(f"/v1/datasets/{ds['id']}")).status_code == 200

    await api.post(f"/v1/runs/{run['id']}/cancel")
    await wait_for(api, run["id"], lambda r: r["state"] == "cancelled")
    r = await api.delete(f"/v1/datasets/{ds['id']}")
    assert r.status_code == 204, r.text
    assert (await api.get(f"/v1/datasets/{ds['id']}")).status_code == 404
    assert (await api.delete(f"/v1/datasets/{ds['id']}")).status_code == 404
    assert [d["id"] for d in (await api.get("/v1/datasets", params={"project": "tests"})).json()["datasets"]] == []
    # The other project's dataset still has its bytes; the finished run still has its own snapshot.
    assert stack.store.exists(f"datasets/sha256/{ds['sha256']}.jsonl")
    assert stack.store.exists(f"runs/{run['id']}/data/train.jsonl")
    assert (await api.get(f"/v1/runs/{run['id']}")).json()["dataset_snapshot"]["sha256"] == ds["sha256"]

    # The last dataset holding the bytes takes the stored file with it; uploading again brings it back.
    assert (await api.delete(f"/v1/datasets/{kept['id']}")).status_code == 204
    assert stored_dataset_files(stack) == []
    back = await upload(api, datasets["instruction"])
    assert back.status_code == 201 and stack.store.exists(f"datasets/sha256/{ds['sha256']}.jsonl")
