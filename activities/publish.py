"""publish: the final checkpoint's adapter, copied to its versioned place with a lineage manifest.

Idempotent: the adapter's keys derive from the run id and the files are verified against
the checkpoint manifest, so a retry rewrites the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time

from activities.errors import user_error
from activities.lineage import code_version, package_versions
from schemas.activities import PublishInput, PublishResult
from schemas.run_spec import canonical_json
from store.artifacts import ArtifactCorrupt, ArtifactStore
from store.db import ArtifactRow, Database

MANIFEST_NAME = "lockn-manifest.json"


def publish_adapter(inp: PublishInput, db: Database, store: ArtifactStore) -> PublishResult:
    ckpt_manifest = json.loads(store.get_bytes(inp.checkpoint.manifest_key))
    ckpt_prefix = inp.checkpoint.manifest_key.rsplit("/", 1)[0]
    prefix = f"runs/{inp.run_id}/adapter"
    files = {}
    for rel, info in ckpt_manifest["files"].items():
        if not rel.startswith("adapter/"):
            continue
        name = rel.removeprefix("adapter/")
        try:
            data = store.get_bytes(f"{ckpt_prefix}/{rel}")
        except (FileNotFoundError, ArtifactCorrupt) as exc:
            raise user_error(f"checkpoint file {rel} cannot be published: {exc}; rerun the run") from None
        # Checked before the copy, so a corrupt file never lands in the published adapter.
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise user_error(f"checkpoint file {rel} changed since it was committed (sha256 mismatch); rerun the run")
        sha = store.put_bytes(f"{prefix}/{name}", data)
        files[name] = {"sha256": sha, "size": len(data)}
    if "adapter_model.safetensors" not in files:
        raise user_error(f"checkpoint {inp.checkpoint.manifest_key} holds no adapter weights")

    step_losses = json.loads(store.get_bytes(f"{ckpt_prefix}/cursor.json"))["losses"]
    plan, hp = inp.plan, inp.plan.hp
    manifest = {
        "format": "lockn-tune.manifest/1",
        "kind": "lora-adapter",
        "run_id": inp.run_id,
        "created_at": time.time(),
        "spec": plan.spec.model_dump(mode="json"),
        "spec_sha256": plan.spec_sha256,
        "dataset": {
            "sha256": inp.snapshot.sha256,
            "shape": inp.snapshot.shape,
            "train_rows": inp.snapshot.train_rows,
            "eval_rows": inp.snapshot.eval_rows,
            "train_sha256": inp.snapshot.train_sha256,
            "eval_sha256": inp.snapshot.eval_sha256,
        },
        "base_model": {
            "id": plan.base_model_id,
            "revision": plan.base_model_revision,
            "model_type": plan.model_type,
            "num_parameters": plan.num_parameters,
        },
        "method": plan.spec.method.value,
        "hyperparameters": {
            **hp.model_dump(mode="json"),
            "micro_batch_size": plan.micro_batch_size,
            "grad_accum": plan.grad_accum,
            "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps,
        },
        "seed": hp.seed,
        "packages": package_versions(),
        "code_version": code_version(),
        "hardware": ckpt_manifest.get("meta", {}).get("hardware", {}),
        "parent": {
            "kind": "checkpoint",
            "key": inp.checkpoint.manifest_key,
            "sha256": inp.checkpoint.manifest_sha256,
            "step": inp.checkpoint.step,
        },
        "metrics": {
            "baseline_eval_loss": inp.baseline.loss,
            "tuned_eval_loss": inp.tuned.loss,
            "baseline_perplexity": inp.baseline.perplexity,
            "tuned_perplexity": inp.tuned.perplexity,
            "final_train_loss": step_losses[-1] if step_losses else None,
            "step_losses": step_losses,
        },
        "files": files,
    }
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    manifest_sha = store.put_bytes(manifest_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    # A directory on this machine only where the store is local; the uri always says where it is.
    adapter_path = store.local_path(prefix)
    db.add_artifact(
        ArtifactRow(
            id=f"art_{inp.run_id}_adapter",
            run_id=inp.run_id,
            kind="adapter",
            uri=store.uri(prefix),
            path=str(adapter_path) if adapter_path else None,
            sha256=files["adapter_model.safetensors"]["sha256"],
            size_bytes=sum(f["size"] for f in files.values()),
            manifest=json.loads(canonical_json(manifest)),
        )
    )
    return PublishResult(
        adapter_uri=store.uri(prefix),
        adapter_path=str(adapter_path) if adapter_path else None,
        manifest_uri=store.uri(manifest_key),
        manifest_sha256=manifest_sha,
    )
