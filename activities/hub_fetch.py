"""Base models from the Hugging Face Hub: fetched once into the artifact store, materialised
on each GPU worker from there.

    fetch_base_model      (worker_cpu) revision -> commit sha; download with huggingface_hub into a
                          staging folder under home; copy into the store under
                          models/<org>--<name>/<commit>/ with the manifest written last
    materialise_base_model (every worker) the stored model as a local directory, every file checked
                          against its sha256, cached under home: preflight and the snapshot on
                          worker_cpu, training and eval on worker_gpu (with_local_base_model)

A cluster downloads a commit once: every later fetch of it finds the manifest and asks the
Hub for nothing when the revision is a commit sha (one metadata request for a branch or tag,
which may have moved). A dropped connection fails the attempt with a retryable error; the
partial file stays in the staging folder and the next attempt resumes it with an HTTP Range
request, so retries belong to Temporal's retry policy, not to a loop here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from temporalio.exceptions import ApplicationError

from activities.base_model import ResolvedBaseModel, model_in_folder
from activities.errors import user_error
from activities.heartbeat import Heartbeater
from schemas.activities import FetchedModel, FetchModelInput, TrainingPlan
from schemas.run_spec import canonical_json
from schemas.settings import Settings
from store.artifacts import ArtifactCorrupt, ArtifactStore, sha256_file
from store.blocking import BlockingDatabase
from store.layout import MODEL_FILES_DIR, model_file_key, model_folder, model_manifest_key, model_prefix

FORMAT = "lockn-tune.model/1"
# The retryable failure of an attempt cut short (connection dropped, Hub unavailable).
DOWNLOAD_INTERRUPTED = "HubDownloadInterrupted"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Weights for other frameworks, never loaded by transformers' PyTorch path.
OTHER_FRAMEWORKS = (".h5", ".msgpack", ".onnx", ".onnx_data", ".tflite", ".ot", ".gguf", ".mlmodel", ".pth")
PROGRESS_STEP = 10  # percent between two progress events
EVENT_KIND = "model_fetch"


def fetch_base_model(inp: FetchModelInput, settings: Settings, db: BlockingDatabase, store: ArtifactStore) -> FetchedModel:
    """Put a Hub repo at a revision into the artifact store, once per commit.

    Resumes from the staging folder home/downloads/hub/<org>--<name>/<commit>: files complete
    there are not fetched again and a partial one continues with a Range request. Progress
    events (bytes, rate) are keyed by commit and percent, so a retried attempt adds no duplicates.
    """
    hub = HubClient.from_settings(settings)
    if COMMIT_SHA.match(inp.revision) and store.exists(model_manifest_key(inp.repo_id, inp.revision)):
        return _reused(inp, inp.revision, db, store)
    with Heartbeater(settings.heartbeat_every_s):  # a slow Hub is not a dead worker
        info = hub.resolve(inp.repo_id, inp.revision)
    if store.exists(model_manifest_key(inp.repo_id, info.commit_sha)):
        return _reused(inp, info.commit_sha, db, store)

    staging = settings.home / "downloads" / "hub" / model_folder(inp.repo_id) / info.commit_sha
    staging.mkdir(parents=True, exist_ok=True)
    check_disk_for_fetch(inp.repo_id, info, staging, store)
    progress = DownloadProgress(inp.run_id, info, staging, db)
    db.add_event(
        inp.run_id, EVENT_KIND, f"fetching {inp.repo_id} at {info.commit_sha[:12]} ({_gb(info.bytes)})",
        {"repo_id": inp.repo_id, "revision": inp.revision, "commit_sha": info.commit_sha, "bytes_total": info.bytes,
         "files": len(info.files)},
        key=f"model-fetch:{info.commit_sha}:start",
    )
    # Heartbeats also while the files are copied into the store, which takes minutes for a big model.
    with Heartbeater(settings.heartbeat_every_s, progress.tick):
        hub.download(inp.repo_id, info, staging)
        progress.tick()
        files = {}
        for rel in info.files:
            path = staging / rel
            files[rel] = {"sha256": store.put_file(model_file_key(inp.repo_id, info.commit_sha, rel), path),
                          "size": path.stat().st_size}
    manifest = {
        "format": FORMAT,
        "repo_id": inp.repo_id,
        "revision": inp.revision,
        "commit_sha": info.commit_sha,
        "endpoint": hub.endpoint,
        "files": files,
        "bytes": sum(f["size"] for f in files.values()),
        "fetched_at": time.time(),
    }
    manifest_sha = store.put_bytes(model_manifest_key(inp.repo_id, info.commit_sha), canonical_json(manifest).encode())
    shutil.rmtree(staging, ignore_errors=True)
    db.add_event(
        inp.run_id, EVENT_KIND, f"stored {inp.repo_id} at {info.commit_sha[:12]}",
        {"commit_sha": info.commit_sha, "bytes": manifest["bytes"], "seconds": round(progress.elapsed(), 3),
         "bytes_per_s": progress.rate()},
        key=f"model-fetch:{info.commit_sha}:stored",
    )
    return _fetched(inp.repo_id, inp.revision, info.commit_sha, manifest, manifest_sha, reused=False)


@dataclass(frozen=True)
class RepoAtCommit:
    """What the Hub says of a repo at a resolved revision: the commit and the files to fetch."""

    commit_sha: str
    sizes: dict[str, int | None]  # file -> bytes, None where the Hub did not say

    @property
    def files(self) -> list[str]:
        return sorted(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(s or 0 for s in self.sizes.values())


@dataclass(frozen=True)
class HubClient:
    """huggingface_hub calls with this deployment's endpoint and token, and their failures as
    the run's errors: what a user can fix fails at once, the rest is retried."""

    endpoint: str
    token: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> "HubClient":
        # Always passed explicitly: huggingface_hub reads HF_ENDPOINT once, at import.
        endpoint = (settings.hf_endpoint or hub_constants.ENDPOINT).rstrip("/")
        return cls(endpoint, settings.hf_token.get_secret_value() or None)

    def resolve(self, repo_id: str, revision: str) -> RepoAtCommit:
        """The commit a revision names and the files to fetch, with their sizes."""
        with self.errors(repo_id, revision):
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                repo_id, revision=revision, files_metadata=True
            )
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        return RepoAtCommit(info.sha, {name: size for name, size in sizes.items() if wanted(name, sizes)})

    def download(self, repo_id: str, info: RepoAtCommit, staging: Path) -> None:
        with self.errors(repo_id, info.commit_sha):
            snapshot_download(
                repo_id,
                revision=info.commit_sha,
                local_dir=staging,
                allow_patterns=info.files,
                endpoint=self.endpoint,
                token=self.token,
                max_workers=4,
            )

    @contextmanager
    def errors(self, repo_id: str, revision: str) -> Iterator[None]:
        """huggingface_hub's exceptions inside the block, raised as the run's errors."""
        try:
            yield
        except Exception as exc:
            err = self.translate(exc, repo_id, revision)
            if err is exc:
                raise
            raise err from exc

    def translate(self, exc: Exception, repo_id: str, revision: str) -> Exception:
        """A user error for what the user can fix, a retryable error for an interrupted
        download, anything else unchanged."""
        repo, page = repo_id, f"{self.endpoint}/{repo_id}"
        token = "LOCKN_TUNE_HF_TOKEN" if self.token else "no token"
        if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is one
            return user_error(
                f"base_model {repo!r} is a gated model and the Hub refused its files ({token} was sent): accept its "
                f"licence at {page} with your Hugging Face account, then set LOCKN_TUNE_HF_TOKEN on the workers to a "
                "token of that account (read access)",
                repo_id=repo,
            )
        if isinstance(exc, RepositoryNotFoundError):
            return user_error(
                f"base_model {repo!r} was not found on the Hugging Face Hub ({self.endpoint}): check the name "
                "(org/name, as on the model's page); if the repo is private, set LOCKN_TUNE_HF_TOKEN on the workers "
                "to a token that can read it",
                repo_id=repo,
            )
        if isinstance(exc, RevisionNotFoundError):
            return user_error(
                f"revision {revision!r} of base_model {repo!r} does not exist on the Hub: name a branch, tag or "
                f"commit of the repo (see {page}/tree/main), or leave the revision out for 'main'",
                repo_id=repo, revision=revision,
            )
        if isinstance(exc, OfflineModeIsEnabled):
            return user_error(
                f"base_model {repo!r} is not in the artifact store yet and this worker is offline (HF_HUB_OFFLINE is "
                "set): unset it on the CPU worker so the model can be fetched, or give a local model directory"
            )
        if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
            return user_error(
                f"the Hugging Face Hub refused the token for base_model {repo!r} "
                f"({exc.response.status_code}): set LOCKN_TUNE_HF_TOKEN on the workers to a valid token",
                repo_id=repo,
            )
        if isinstance(exc, (requests.RequestException, OSError)):
            # Dropped connections, timeouts, 5xx, a file cut short: the next attempt resumes.
            return ApplicationError(
                f"downloading {repo!r} from {self.endpoint} was interrupted: {type(exc).__name__}: {exc}",
                type=DOWNLOAD_INTERRUPTED,
            )
        return exc


def wanted(name: str, files: dict) -> bool:
    """Whether a repo file belongs in the model: not another framework's weights, and no
    PyTorch .bin weights where the repo has safetensors."""
    if name.endswith(OTHER_FRAMEWORKS) or name.startswith(("onnx/", "coreml/", "openvino/", "flax_model")):
        return False
    if name.endswith(".bin") and "model" in name and any(f.endswith(".safetensors") for f in files):
        return False
    return True


def check_disk_for_fetch(repo_id: str, info: RepoAtCommit, staging: Path, store: ArtifactStore) -> None:
    """Refuse before downloading when the files cannot fit: the staging folder needs what is
    still missing there, and a local store needs the whole model again."""
    staged = sum((staging / f).stat().st_size for f in info.files if (staging / f).is_file())
    need = {staging: max(info.bytes - staged, 0)}
    store_dir = store.local_path(model_prefix(repo_id, info.commit_sha))
    if store_dir is not None:
        root = next(p for p in [store_dir, *store_dir.parents] if p.exists())
        same_disk = root.stat().st_dev == staging.stat().st_dev
        if same_disk:
            need[staging] += info.bytes
        else:
            need[root] = info.bytes
    for where, nbytes in need.items():
        free = shutil.disk_usage(where).free
        if nbytes > free:
            raise user_error(
                f"not enough disk to fetch the base model ({info.commit_sha[:12]}): it needs {_gb(nbytes)} at "
                f"{where} and {_gb(free)} are free; free some space, or point LOCKN_TUNE_HOME (downloads) or "
                "LOCKN_TUNE_ARTIFACTS_DIR (the store) at a larger disk",
                need_bytes=nbytes, free_bytes=free,
            )


@dataclass
class DownloadProgress:
    """Bytes on disk in the staging folder (partial files included), measured at each
    heartbeat; a progress event each time another PROGRESS_STEP percent is done."""

    run_id: str
    info: RepoAtCommit
    staging: Path
    db: BlockingDatabase
    started: float = field(default_factory=time.monotonic)
    start_bytes: int = -1
    done: int = 0
    reported: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.start_bytes = self.measure()
        self.done = self.start_bytes

    def measure(self) -> int:
        return sum(p.stat().st_size for p in self.staging.rglob("*") if p.is_file() and not p.name.endswith(".lock"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Bytes per second fetched by this attempt."""
        return round((self.done - self.start_bytes) / max(self.elapsed(), 1e-6), 1)

    def tick(self) -> dict:
        """Measure, report a new PROGRESS_STEP bucket once, and return the heartbeat's details."""
        # Metadata files in the staging folder can exceed the total by a few bytes at the end.
        self.done = min(self.measure(), self.info.bytes) if self.info.bytes else self.measure()
        percent = 100 * self.done // self.info.bytes if self.info.bytes else 100
        bucket = percent - percent % PROGRESS_STEP
        data = {"bytes_done": self.done, "bytes_total": self.info.bytes, "bytes_per_s": self.rate(), "percent": percent}
        if bucket not in self.reported:
            self.reported.add(bucket)
            self.db.add_event(
                self.run_id, EVENT_KIND, f"downloaded {_gb(self.done)} of {_gb(self.info.bytes)}", data,
                key=f"model-fetch:{self.info.commit_sha}:{bucket}",
            )
        return data


def materialise_base_model(store: ArtifactStore, manifest_key: str, home: Path) -> Path:
    """The stored model as a directory on this machine, for transformers' from_pretrained.

    Every file is checked against its sha256 in the manifest once; a marker naming the
    manifest's sha256 records that, so later calls (each chunk of a run) return at once.
    A local store is read in place; any other is copied to home/models/<org>--<name>/<commit>.
    Raises ArtifactCorrupt for a file whose bytes do not match.
    """
    raw = store.get_bytes(manifest_key)
    manifest = json.loads(raw)
    repo_id, commit = manifest["repo_id"], manifest["commit_sha"]
    digest = hashlib.sha256(raw).hexdigest()
    marker = home / "models" / model_folder(repo_id) / f"{commit}.verified"
    in_place = store.local_path(f"{model_prefix(repo_id, commit)}/{MODEL_FILES_DIR}")
    target = in_place if in_place is not None else home / "models" / model_folder(repo_id) / commit
    if marker.is_file() and marker.read_text() == digest and target.is_dir():
        return target
    if in_place is None:
        missing = sum(
            info["size"] for rel, info in manifest["files"].items()
            if not (target / rel).is_file() or (target / rel).stat().st_size != info["size"]
        )
        target.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target).free
        if missing > free:
            raise user_error(
                f"not enough disk on this GPU worker for base model {repo_id} ({commit[:12]}): it needs {_gb(missing)} "
                f"at {target} and {_gb(free)} are free; free some space or point LOCKN_TUNE_HOME at a larger disk"
            )
    for rel, info in manifest["files"].items():
        key = model_file_key(repo_id, commit, rel)
        path = target / rel
        if in_place is None and not (path.is_file() and sha256_file(path) == info["sha256"]):
            store.get_file(key, path)
        actual = sha256_file(path)
        if actual != info["sha256"]:
            if in_place is None:
                path.unlink(missing_ok=True)
            raise ArtifactCorrupt(key, str(path), info["sha256"], actual)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest)
    return target


def stored_base_model(store: ArtifactStore, fetched: FetchedModel, home: Path) -> ResolvedBaseModel:
    """A base model fetched into the artifact store, as a verified folder on this machine,
    named by its Hub commit (what preflight plans with)."""
    path = materialise_base_model(store, fetched.manifest_key, home)
    return model_in_folder(fetched.repo_id, path, fetched.commit_sha, fetched.manifest_key)


def with_local_base_model(plan: TrainingPlan, store: ArtifactStore, home: Path) -> TrainingPlan:
    """The plan with base_model_path on this machine. A path made on another machine is never
    trusted for a model from the store: it is materialised here from the plan's manifest key.
    A plan of a local directory or cache is returned as it is."""
    if plan.base_model_manifest_key is None:
        return plan
    path = materialise_base_model(store, plan.base_model_manifest_key, home)
    return plan.model_copy(update={"base_model_path": str(path)})


def _reused(inp: FetchModelInput, commit: str, db: BlockingDatabase, store: ArtifactStore) -> FetchedModel:
    key = model_manifest_key(inp.repo_id, commit)
    raw = store.get_bytes(key)
    manifest = json.loads(raw)
    db.add_event(
        inp.run_id, EVENT_KIND, f"{inp.repo_id} at {commit[:12]} is already in the store",
        {"commit_sha": commit, "bytes": manifest["bytes"]}, key=f"model-fetch:{commit}:reused",
    )
    return _fetched(inp.repo_id, inp.revision, commit, manifest, hashlib.sha256(raw).hexdigest(), reused=True)


def _fetched(repo_id: str, revision: str, commit: str, manifest: dict, manifest_sha: str, *, reused: bool) -> FetchedModel:
    return FetchedModel(
        repo_id=repo_id,
        revision=revision,
        commit_sha=commit,
        store_prefix=model_prefix(repo_id, commit),
        manifest_key=model_manifest_key(repo_id, commit),
        manifest_sha256=manifest_sha,
        files=sorted(manifest["files"]),
        bytes=manifest["bytes"],
        reused=reused,
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
