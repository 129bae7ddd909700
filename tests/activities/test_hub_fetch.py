"""fetch_base_model against a loopback Hugging Face Hub (tests/hub_server.py) serving the
tiny model: fetch, resume after a connection dropped mid-file, reuse of the store without a
request, gated / missing repo / missing revision messages, the disk check, and the GPU side's
materialised directory loading with transformers offline. Nothing reaches huggingface.co:
every call gets the loopback endpoint from the settings.

Run: python -m pytest tests/activities/test_hub_fetch.py -x -q
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.cpu import CpuActivities
from activities.hub_fetch import DOWNLOAD_INTERRUPTED, EVENT_KIND, materialise_base_model, with_local_base_model
from schemas.activities import FetchedModel, FetchModelInput, TrainingPlan
from schemas.errors import USER_ERROR
from schemas.settings import Settings
from store.artifacts import ArtifactCorrupt, LocalArtifactStore
from store.blocking import BlockingDatabase
from store.layout import model_file_key, model_manifest_key
from store.open_store import open_store
from tests.conftest import small_spec
from tests.hub_server import online_hub

REPO = "lockn-tests/tiny-llama"
WEIGHTS = "model.safetensors"


@pytest.fixture
def hub(monkeypatch):
    """The loopback Hub, with huggingface_hub online for this test only."""
    with online_hub(monkeypatch) as server:
        yield server


@pytest.fixture
def cpu(hub, tmp_path):
    """worker_cpu's activities on a fresh home, pointed at the loopback Hub."""
    settings = Settings(home=tmp_path / "home", hf_endpoint=hub.url, heartbeat_every_s=0.05)
    db = BlockingDatabase(settings.db_url)
    yield CpuActivities(settings, db, open_store(settings))
    db.close()


def fetch(cpu: CpuActivities, revision: str = "main", repo: str = REPO, run_id: str = "run-1", **settings) -> FetchedModel:
    if settings:
        cpu = CpuActivities(cpu.settings.model_copy(update=settings), cpu.db, cpu.store)
    return ActivityEnvironment().run(cpu.fetch_base_model, FetchModelInput(run_id=run_id, repo_id=repo, revision=revision))


def events(cpu: CpuActivities, run_id: str = "run-1") -> list:
    return cpu.db.events(run_id, kind=EVENT_KIND)


def test_a_fetch_stores_every_file_under_its_commit_with_the_manifest_last(hub, cpu, tiny_model):
    sha = hub.add_repo(REPO, tiny_model)
    got = fetch(cpu)
    assert got.commit_sha == sha and not got.reused
    assert got.manifest_key == model_manifest_key(REPO, sha)
    manifest = json.loads(cpu.store.get_bytes(got.manifest_key))
    assert manifest["commit_sha"] == sha and manifest["repo_id"] == REPO and manifest["revision"] == "main"
    originals = {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == set(originals) == set(got.files)
    for rel, data in originals.items():
        assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert cpu.store.get_bytes(model_file_key(REPO, sha, rel)) == data
    assert got.bytes == sum(map(len, originals.values()))
    # The staging folder is gone once the store holds the model.
    assert not (cpu.settings.home / "downloads" / "hub" / "lockn-tests--tiny-llama" / sha).exists()
    rows = events(cpu)
    stored = [e for e in rows if e.key == f"model-fetch:{sha}:stored"]
    assert len(stored) == 1 and stored[0].data["bytes"] == got.bytes and stored[0].data["bytes_per_s"] > 0
    done = [e for e in rows if e.key == f"model-fetch:{sha}:100"]
    assert done and done[0].data["bytes_done"] == done[0].data["bytes_total"] == got.bytes


def test_a_fetch_cut_mid_file_fails_retryably_and_the_next_attempt_resumes_with_range(hub, cpu, tiny_model):
    sha = hub.add_repo(REPO, tiny_model)
    size = (tiny_model / WEIGHTS).stat().st_size
    hub.drop_once(WEIGHTS)
    with pytest.raises(ApplicationError) as failed:
        fetch(cpu)
    assert failed.value.type == DOWNLOAD_INTERRUPTED and not failed.value.non_retryable
    assert not cpu.store.exists(model_manifest_key(REPO, sha)), "nothing is committed by a failed attempt"

    hub.requests.clear()
    got = fetch(cpu)  # what Temporal's retry runs
    resumed = [r for r in hub.requests if r.method == "GET" and r.range]
    assert len(resumed) == 1 and resumed[0].path.startswith("/cdn/")
    offset = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < size, f"resumed at byte {offset} of {size}"
    stored = cpu.store.get_bytes(model_file_key(REPO, sha, WEIGHTS))
    assert stored == (tiny_model / WEIGHTS).read_bytes()
    assert json.loads(cpu.store.get_bytes(got.manifest_key))["files"][WEIGHTS]["sha256"] == hashlib.sha256(stored).hexdigest()
    # Files finished by the first attempt are not fetched again.
    assert not [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_a_second_fetch_reuses_the_store(hub, cpu, tiny_model):
    sha = hub.add_repo(REPO, tiny_model)
    first = fetch(cpu)
    hub.requests.clear()
    again = fetch(cpu, revision=sha, run_id="run-2")
    assert hub.requests == [], "a commit already in the store needs no request"
    assert again.reused and again.manifest_sha256 == first.manifest_sha256 and again.files == first.files
    assert [e.key for e in events(cpu, "run-2")] == [f"model-fetch:{sha}:reused"]
    # A branch may have moved: one metadata request says where it points, and no file is fetched.
    by_branch = fetch(cpu, revision="main", run_id="run-3")
    assert by_branch.reused and by_branch.commit_sha == sha
    assert [(r.method, r.path.split("?")[0]) for r in hub.requests] == [("GET", f"/api/models/{REPO}/revision/main")]


def test_a_gated_repo_says_to_accept_the_licence_and_set_the_token(hub, cpu, tiny_model):
    sha = hub.add_repo(REPO, tiny_model, gated=True, tokens=("hf_good",))
    with pytest.raises(ApplicationError) as refused:
        fetch(cpu, hf_token=SecretStr("hf_wrong"))
    err = refused.value
    assert err.type == USER_ERROR and err.non_retryable
    assert "gated" in err.message and "accept its licence" in err.message and "LOCKN_TUNE_HF_TOKEN" in err.message
    assert f"{hub.url}/{REPO}" in err.message
    assert fetch(cpu, hf_token=SecretStr("hf_good")).commit_sha == sha
    assert {r.authorization for r in hub.requests if "/resolve/" in r.path} >= {"Bearer hf_good"}


def test_a_missing_repo_and_a_missing_revision_say_what_to_check(hub, cpu, tiny_model):
    hub.add_repo(REPO, tiny_model)
    with pytest.raises(ApplicationError) as missing:
        fetch(cpu, repo="lockn-tests/no-such-model")
    assert missing.value.type == USER_ERROR and missing.value.non_retryable
    assert "'lockn-tests/no-such-model' was not found on the Hugging Face Hub" in missing.value.message
    with pytest.raises(ApplicationError) as no_revision:
        fetch(cpu, revision="v9")
    assert no_revision.value.type == USER_ERROR
    assert f"revision 'v9' of base_model '{REPO}' does not exist on the Hub" in no_revision.value.message


def test_the_disk_is_checked_before_any_file_is_fetched(hub, cpu, tiny_model, monkeypatch):
    hub.add_repo(REPO, tiny_model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ApplicationError) as full:
        fetch(cpu)
    assert full.value.type == USER_ERROR and "not enough disk" in full.value.message
    assert all(r.path.startswith("/api/models/") for r in hub.requests)


class RemoteLikeStore(LocalArtifactStore):
    """A local store that hides its paths, as S3 does: the GPU side must copy and verify."""

    def local_path(self, key: str) -> Path | None:
        return None


def test_the_materialised_model_loads_offline_and_bad_bytes_are_refused(hub, cpu, tiny_model, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    hub.add_repo(REPO, tiny_model)
    got = fetch(cpu)
    # A local store is read in place.
    in_place = materialise_base_model(cpu.store, got.manifest_key, tmp_path / "gpu-home")
    assert in_place == cpu.store.local_path(f"{got.store_prefix}/files")
    # Any other store is copied under the GPU worker's home.
    remote = RemoteLikeStore(cpu.store.root)
    gpu_home = tmp_path / "gpu-home-2"
    local = materialise_base_model(remote, got.manifest_key, gpu_home)
    assert local.is_relative_to(gpu_home)
    config = AutoConfig.from_pretrained(local, local_files_only=True)
    assert config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert materialise_base_model(remote, got.manifest_key, gpu_home) == local  # the marker: no second pass

    # A blob altered in the store is refused, never handed to training.
    (local / WEIGHTS).unlink()
    blob = cpu.store.local_path(model_file_key(REPO, got.commit_sha, WEIGHTS))
    blob.write_bytes(b"not the weights")
    with pytest.raises(ArtifactCorrupt):
        materialise_base_model(remote, got.manifest_key, tmp_path / "gpu-home-3")


def test_a_runs_fetch_step_leaves_a_local_folder_to_preflight(hub, cpu, tiny_model):
    spec = small_spec(tiny_model, "unused.jsonl")
    step = FetchModelInput(run_id="run-1", repo_id=spec.base_model, spec=spec)
    assert ActivityEnvironment().run(cpu.fetch_base_model, step) is None
    assert hub.requests == [] and events(cpu) == []


def test_a_plan_made_on_another_machine_loads_the_model_from_the_store(hub, cpu, tiny_model, tmp_path):
    hub.add_repo(REPO, tiny_model)
    got = fetch(cpu)
    elsewhere = TrainingPlan.model_construct(base_model_path="/on/the/cpu/worker", base_model_manifest_key=got.manifest_key)
    gpu_home = tmp_path / "gpu-home"
    here = with_local_base_model(elsewhere, RemoteLikeStore(cpu.store.root), gpu_home)
    assert Path(here.base_model_path).is_relative_to(gpu_home)
    assert (Path(here.base_model_path) / WEIGHTS).read_bytes() == (tiny_model / WEIGHTS).read_bytes()
    local = TrainingPlan.model_construct(base_model_path=str(tiny_model), base_model_manifest_key=None)
    assert with_local_base_model(local, cpu.store, gpu_home) is local
