"""publish: a checkpoint's adapter, copied to its versioned place with a lineage manifest and
a model card (README.md).

Idempotent: the adapter's keys derive from the run id, the files are verified against the
checkpoint manifest, and neither the manifest nor the card reads the clock (the adapter's
time is the checkpoint's commit time), so a retry rewrites the same bytes.

Also publishes the newest checkpoint of a run that was cancelled or failed (the
PublishCheckpoint workflow): such a partial adapter was never evaluated, and its manifest
and card say from which step of how many it comes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from activities.errors import user_error
from activities.lineage import code_version, package_versions
from schemas.activities import PublishInput, PublishResult
from schemas.run_spec import canonical_json
from store.artifacts import ArtifactCorrupt, ArtifactStore
from store.blocking import BlockingDatabase
from store.checkpoints import checkpoint_losses
from store.layout import (
    ADAPTER_CARD,
    ADAPTER_MANIFEST,
    ADAPTER_WEIGHTS,
    adapter_manifest_key,
    adapter_prefix,
    checkpoint_adapter_file,
    checkpoint_file_key,
)
from store.tables import ArtifactRow

METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


def publish_adapter(inp: PublishInput, db: BlockingDatabase, store: ArtifactStore) -> PublishResult:
    """Copy the checkpoint's adapter files to runs/<id>/adapter, write the model card and the
    manifest (last), and record the artifact."""
    ckpt_manifest = json.loads(store.get_bytes(inp.checkpoint.manifest_key))
    step = inp.checkpoint.step
    prefix = adapter_prefix(inp.run_id)
    files = {}
    for rel, info in ckpt_manifest["files"].items():
        name = checkpoint_adapter_file(rel)
        if name is None or name == ADAPTER_CARD:
            continue  # not the adapter's; or PEFT's empty card template, which the card below replaces
        try:
            data = store.get_bytes(checkpoint_file_key(inp.run_id, step, rel))
        except (FileNotFoundError, ArtifactCorrupt) as exc:
            raise user_error(f"checkpoint file {rel} cannot be published: {exc}; rerun the run") from None
        # Checked before the copy, so a corrupt file never lands in the published adapter.
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise user_error(f"checkpoint file {rel} changed since it was committed (sha256 mismatch); rerun the run")
        sha = store.put_bytes(f"{prefix}/{name}", data)
        files[name] = {"sha256": sha, "size": len(data)}
    if ADAPTER_WEIGHTS not in files:
        raise user_error(f"checkpoint {inp.checkpoint.manifest_key} holds no adapter weights")

    step_losses = checkpoint_losses(store, inp.run_id, step)
    manifest = _manifest(inp, ckpt_manifest, step_losses, files)
    adapter_path = store.local_path(prefix)  # a directory on this machine only where the store is local
    card = model_card(manifest, str(adapter_path) if adapter_path else store.uri(prefix))
    card_bytes = card.encode()
    files[ADAPTER_CARD] = {"sha256": store.put_bytes(f"{prefix}/{ADAPTER_CARD}", card_bytes), "size": len(card_bytes)}
    manifest["files"] = files
    manifest_key = adapter_manifest_key(inp.run_id)
    manifest_sha = store.put_bytes(manifest_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    db.add_artifact(
        ArtifactRow(
            id=f"art_{inp.run_id}_adapter",
            run_id=inp.run_id,
            kind="adapter",
            uri=store.uri(prefix),
            path=str(adapter_path) if adapter_path else None,
            sha256=files[ADAPTER_WEIGHTS]["sha256"],
            size_bytes=sum(f["size"] for f in files.values()),
            manifest=json.loads(canonical_json(manifest)),
            created_at=manifest["created_at"],
        )
    )
    return PublishResult(
        adapter_uri=store.uri(prefix),
        adapter_path=str(adapter_path) if adapter_path else None,
        manifest_uri=store.uri(manifest_key),
        manifest_sha256=manifest_sha,
    )


def _manifest(inp: PublishInput, ckpt_manifest: dict, step_losses: list[float], files: dict) -> dict:
    plan, hp = inp.plan, inp.plan.hp
    baseline, tuned = inp.baseline, inp.tuned
    return {
        "format": "lockn-tune.manifest/1",
        "kind": "lora-adapter",
        "run_id": inp.run_id,
        # When these weights were made: the checkpoint's commit, never the publish's clock.
        "created_at": ckpt_manifest["committed_at"],
        "partial": inp.partial.model_dump(mode="json") if inp.partial else None,
        "spec": plan.spec.model_dump(mode="json"),
        "spec_sha256": plan.spec_sha256,
        "dataset": {
            "sha256": inp.snapshot.sha256,
            "shape": inp.snapshot.shape,
            "total_rows": inp.snapshot.total_rows,
            "bad_rows": inp.snapshot.bad_rows,
            "train_rows": inp.snapshot.train_rows,
            "eval_rows": inp.snapshot.eval_rows,
            "train_sha256": inp.snapshot.train_sha256,
            "eval_sha256": inp.snapshot.eval_sha256,
            "token_stats": inp.snapshot.token_stats.model_dump(mode="json"),
        },
        "base_model": {
            "id": plan.base_model_id,
            "revision": plan.base_model_revision,
            # A hub model's revision is its commit (fetched into the store, or the cache snapshot's
            # folder name); a local one's, the weights' sha256.
            "source": "hub"
            if plan.base_model_manifest_key or plan.base_model_revision == Path(plan.base_model_path).name
            else "local",
            "model_type": plan.model_type,
            "num_parameters": plan.num_parameters,
        },
        "method": plan.spec.method.value,
        "hyperparameters": {
            **hp.model_dump(mode="json"),
            "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps,
            "precision": plan.precision,
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
            "baseline_eval_loss": baseline.loss if baseline else None,
            "tuned_eval_loss": tuned.loss if tuned else None,
            "baseline_perplexity": baseline.perplexity if baseline else None,
            "tuned_perplexity": tuned.perplexity if tuned else None,
            "checkpoint_eval_loss": ckpt_manifest.get("meta", {}).get("eval_loss"),
            "final_train_loss": step_losses[-1] if step_losses else None,
            "step_losses": step_losses,
        },
        "files": files,
    }


def _num(v: float | None, digits: int = 4) -> str:
    return "not measured" if v is None else f"{v:.{digits}f}"


def model_card(manifest: dict, location: str) -> str:
    """The adapter's README.md: what it was tuned from, on what, how, how well, and how to
    load it. A pure function of the manifest and where the adapter lies."""
    base, data, hp, m = manifest["base_model"], manifest["dataset"], manifest["hyperparameters"], manifest["metrics"]
    partial = manifest.get("partial")
    spec = manifest["spec"]
    title = spec.get("name") or manifest["run_id"]
    method = METHOD_NAMES.get(manifest["method"], manifest["method"])
    stats = data.get("token_stats") or {}
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(base['id'])}",
        "tags:",
        f"- {manifest['method']}",
        "- lockn-tune",
        *(["- partial"] if partial else []),
        "---",
        "",
        f"# {title}: a {method} adapter for {base['id']}",
        "",
    ]
    if partial:
        how = f"a {partial['run_state']} run" + (f" ({partial['reason']})" if partial.get("reason") else "")
        lines += [
            f"> **Partial adapter**: the checkpoint from step {partial['step']} of {partial['total_steps']} "
            f"of {how}. Training did not finish and this adapter was never evaluated.",
            "",
        ]
    lines += [
        f"Tuned by LockN Tune, run `{manifest['run_id']}` (spec sha256 `{manifest['spec_sha256']}`, "
        f"code {manifest['code_version']}).",
        "",
        "## Base model",
        "",
        f"- id: `{base['id']}`",
        f"- revision: `{base['revision']}`" + (" (sha256 of the local weight files)" if base.get("source") == "local" else ""),
        f"- architecture: {base['model_type']}, {base['num_parameters']:,} parameters",
        "",
        "## Data",
        "",
        f"- dataset sha256: `{data['sha256']}`",
        f"- shape: {data['shape']}; {data.get('total_rows', data['train_rows'] + data['eval_rows'])} rows"
        + (f" ({data['bad_rows']} skipped as invalid)" if data.get("bad_rows") else ""),
        f"- split: {data['train_rows']} train / {data['eval_rows']} eval rows "
        f"(train sha256 `{data['train_sha256']}`, eval sha256 `{data['eval_sha256']}`)",
    ]
    if stats:
        lines.append(
            f"- tokens per row: min {stats['min']}, mean {stats['mean']}, max {stats['max']}; "
            f"{stats['truncated_rows']} rows truncated to {hp.get('max_seq_len')} tokens; "
            f"{stats['trained_tokens']} answer tokens carry the loss"
        )
    lines += [
        "",
        "## Method and hyperparameters",
        "",
        f"{method} on `{json.dumps(hp.get('target_modules'))}` modules, "
        f"{hp.get('precision', 'float32')} compute, seed {manifest['seed']}.",
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in sorted(hp.items())]
    lines += [
        "",
        "## Metrics",
        "",
        "| | eval loss | perplexity |",
        "| --- | --- | --- |",
        f"| base model | {_num(m['baseline_eval_loss'])} | {_num(m['baseline_perplexity'], 2)} |",
        f"| with this adapter | {_num(m['tuned_eval_loss'])} | {_num(m['tuned_perplexity'], 2)} |",
        "",
    ]
    if m.get("tuned_eval_loss") is not None and m.get("baseline_eval_loss") is not None:
        change = m["tuned_eval_loss"] - m["baseline_eval_loss"]
        lines += [f"Eval loss change: {change:+.4f} on the {data['eval_rows']} held-out rows.", ""]
    if m.get("checkpoint_eval_loss") is not None and m.get("tuned_eval_loss") is None:
        lines += [f"Eval loss measured at the checkpoint: {_num(m['checkpoint_eval_loss'])}.", ""]
    lines += [
        f"Last training loss: {_num(m['final_train_loss'])} after {manifest['parent']['step']} "
        f"of {hp['total_steps']} steps.",
        "",
        "## How to load it",
        "",
        f"The adapter lies at `{location}`"
        + ("" if location.startswith("/") else " (download that folder first)")
        + ". With transformers and peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
    ]
    revision = f", revision={json.dumps(base['revision'])}" if base.get("source") == "hub" else ""
    lines += [
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base['id'])}{revision})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(base['id'])}{revision})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(location)})"
        if location.startswith("/")
        else f"model = PeftModel.from_pretrained(base, \"adapter\")  # the folder downloaded from {location}",
        "```",
        "",
        f"Lineage (spec, packages, hardware, per-step losses, file sha256s) is in `{ADAPTER_MANIFEST}` beside this card.",
        "",
    ]
    return "\n".join(lines)
