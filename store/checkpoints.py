"""Checkpoints in the artifact store, committed by their manifest.

A checkpoint is a directory of files (PEFT adapter, optimizer/scheduler/RNG state, data
cursor). Its files go up first; the manifest, naming every file with its sha256, goes up
last. A checkpoint without a manifest does not exist; one whose files do not match their
manifest is skipped for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import structlog

from schemas.activities import CheckpointRef
from schemas.run_spec import canonical_json
from store.artifacts import ArtifactCorrupt, ArtifactStore, sha256_file
from store.layout import (
    CHECKPOINT_CURSOR_FILE,
    checkpoint_dir_name,
    checkpoint_file_key,
    checkpoint_manifest_key,
    checkpoint_prefix,
    checkpoint_step,
    checkpoints_prefix,
)

log = structlog.get_logger(__name__)

FORMAT = "lockn-tune.checkpoint/1"


def commit_checkpoint(
    store: ArtifactStore, run_id: str, step: int, src: Path, meta: dict, before_manifest=lambda: None
) -> CheckpointRef:
    """Upload every file under src, then the manifest. Idempotent for a step already committed.
    before_manifest runs between the two (the fault tests kill the worker there)."""
    manifest_key = checkpoint_manifest_key(run_id, step)
    files = {}
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        sha = store.put_file(checkpoint_file_key(run_id, step, rel), path)
        files[rel] = {"sha256": sha, "size": path.stat().st_size}
    before_manifest()
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "step": step,
        "files": files,
        "meta": meta,
        "committed_at": time.time(),
    }
    sha = store.put_bytes(manifest_key, canonical_json(manifest).encode())
    return CheckpointRef(manifest_key=manifest_key, step=step, manifest_sha256=sha)


def committed_steps(store: ArtifactStore, run_id: str) -> list[int]:
    """Steps with a manifest, newest first."""
    steps = {checkpoint_step(key, run_id) for key in store.list(checkpoints_prefix(run_id))}
    return sorted(steps - {None}, reverse=True)


def fetch_checkpoint(store: ArtifactStore, run_id: str, step: int, dest: Path) -> tuple[CheckpointRef, dict] | None:
    """Download checkpoint `step` into dest and verify it; None when it is missing or corrupt."""
    manifest_key = checkpoint_manifest_key(run_id, step)
    try:
        raw = store.get_bytes(manifest_key)
        manifest = json.loads(raw)
        for rel, info in manifest["files"].items():
            path = store.get_file(checkpoint_file_key(run_id, step, rel), Path(dest) / rel)
            if sha256_file(path) != info["sha256"]:
                raise ValueError(f"{rel} does not match its sha256 in the manifest")
    except (OSError, ValueError, KeyError, ArtifactCorrupt) as exc:
        log.warning("checkpoint.skipped", run_id=run_id, step=step, reason=str(exc))
        return None
    ref = CheckpointRef(manifest_key=manifest_key, step=step, manifest_sha256=hashlib.sha256(raw).hexdigest())
    return ref, manifest


def fetch_latest_checkpoint(store: ArtifactStore, run_id: str, dest: Path) -> tuple[CheckpointRef, dict, Path] | None:
    """The newest checkpoint that verifies, downloaded under dest/<step>; None when there is none."""
    for step in committed_steps(store, run_id):
        target = Path(dest) / checkpoint_dir_name(step)
        found = fetch_checkpoint(store, run_id, step, target)
        if found:
            return found[0], found[1], target
    return None


def checkpoint_losses(store: ArtifactStore, run_id: str, step: int) -> list[float]:
    """Every step's loss since step 1, as the checkpoint at `step` recorded them in its cursor."""
    return json.loads(store.get_bytes(checkpoint_file_key(run_id, step, CHECKPOINT_CURSOR_FILE)))["losses"]


def prune_checkpoints(store: ArtifactStore, run_id: str, keep_last: int) -> list[int]:
    """Delete all but the newest keep_last checkpoints and the one with the lowest eval loss.
    A checkpoint's manifest goes first, so a half-deleted checkpoint no longer exists."""
    steps = committed_steps(store, run_id)
    evals = {}
    for step in steps:
        try:
            meta = json.loads(store.get_bytes(checkpoint_manifest_key(run_id, step))).get("meta", {})
        except (OSError, ValueError, ArtifactCorrupt):
            continue
        if meta.get("eval_loss") is not None:
            evals[step] = meta["eval_loss"]
    keep = set(steps[:keep_last])
    if evals:
        keep.add(min(evals, key=lambda s: (evals[s], -s)))
    deleted = []
    for step in steps:
        if step not in keep:
            store.delete_prefix(checkpoint_manifest_key(run_id, step))
            store.delete_prefix(checkpoint_prefix(run_id, step))
            deleted.append(step)
    return deleted
