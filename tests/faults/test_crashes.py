"""Fault injection on a real `lockn-tune up` stack: the GPU worker is SIGKILLed while a
chunk loads its model, mid-chunk, and between a checkpoint's files and its manifest; the
Temporal dev server and the API are SIGKILLed mid-run. The supervisor restarts each; every
run finishes, and its adapter is the same, bit for bit, as an uninterrupted run's."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx

from activities.demo_data import write_demo_dataset
from tests.stack_process import UpProcess, get_json, pids, wait_run

FAST_FAILOVER = {"LOCKN_TUNE_HEARTBEAT_EVERY_S": "1", "LOCKN_TUNE_HEARTBEAT_TIMEOUT_S": "5"}


def adapter_sha(run: dict) -> str:
    return hashlib.sha256((Path(run["adapter_path"]) / "adapter_model.safetensors").read_bytes()).hexdigest()


def submit(url: str, spec: dict) -> str:
    r = httpx.post(f"{url}/v1/runs", json=spec, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def events(url: str, run_id: str) -> str:
    return httpx.get(f"{url}/v1/runs/{run_id}/events", params={"follow": "false"}, timeout=30).text


def spec_for(tiny_model: Path, data: Path, name: str) -> dict:
    return {
        "project": "faults", "name": name, "base_model": str(tiny_model), "dataset": str(data),
        "checkpoint_every_steps": 20,
        "hyperparameters": {
            "max_steps": 80, "learning_rate": 3e-3, "max_seq_len": 96, "micro_batch_size": 8, "grad_accum": 1,
            "batching": "padding_free",  # preflight's choice on CPU, pinned: kills with packed rows resume exactly too
        },
    }


def test_gpu_worker_killed_at_every_stage_loses_nothing(tmp_path, tiny_model):
    home = tmp_path / "home"
    up = UpProcess(home, env={**FAST_FAILOVER, "LOCKN_TUNE_FAULTS": "model_load,checkpoint_write,step=37"})
    up.start()
    try:
        data = write_demo_dataset(tmp_path / "data.jsonl", rows=120)
        crashed = submit(up.url, spec_for(tiny_model, data, "crashed"))
        run = wait_run(up.url, crashed, lambda r: r["state"] in ("succeeded", "failed", "cancelled"), timeout=400)
        assert run["state"] == "succeeded", run["error"]
        fired = sorted(p.name for p in (home / "faults").iterdir())
        assert fired == ["checkpoint_write", "model_load", "step=37"]
        # The kill at step 37 resumed from the checkpoint at step 20: at most one interval lost.
        assert "resumed from checkpoint at step 20" in events(up.url, crashed)

        # Every fault has fired once: this run is never interrupted.
        clean = submit(up.url, spec_for(tiny_model, data, "clean"))
        reference = wait_run(up.url, clean, lambda r: r["state"] == "succeeded", timeout=300)
        assert adapter_sha(run) == adapter_sha(reference)
        assert run["tuned_eval_loss"] == reference["tuned_eval_loss"]
        # Every step's loss after each resume matches the uninterrupted run's, exactly.
        losses = lambda r: get_json(f"{up.url}/v1/runs/{r['id']}")["artifacts"][0]["manifest"]["metrics"]["step_losses"]  # noqa: E731
        assert losses(run) == losses(reference) and len(losses(run)) == 80
    finally:
        assert up.stop() == 0
    log = up.proc.stdout.read()
    assert log.count("worker_gpu exited with code -9; restarting") == 3


def test_temporal_and_api_killed_mid_run(tmp_path, tiny_model):
    home = tmp_path / "home"
    up = UpProcess(home, env=FAST_FAILOVER)
    up.start()
    try:
        data = write_demo_dataset(tmp_path / "data.jsonl", rows=120)
        spec = spec_for(tiny_model, data, "outage")
        spec["hyperparameters"]["max_steps"] = 400
        spec["checkpoint_every_steps"] = 100
        run_id = submit(up.url, spec)
        wait_run(up.url, run_id, lambda r: r["state"] == "training" and r["step"] >= 30)
        os.kill(pids(home)["temporal"], signal.SIGKILL)
        time.sleep(3)
        os.kill(pids(home)["api"], signal.SIGKILL)
        run = wait_run(up.url, run_id, lambda r: r["state"] in ("succeeded", "failed", "cancelled"), timeout=400)
        assert run["state"] == "succeeded", run["error"]
        assert get_json(f"{up.url}/healthz")["temporal"] == "ok"

        clean = submit(up.url, {**spec, "name": "clean"})
        reference = wait_run(up.url, clean, lambda r: r["state"] == "succeeded", timeout=300)
        assert adapter_sha(run) == adapter_sha(reference)
    finally:
        assert up.stop() == 0
    log = up.proc.stdout.read()
    assert "temporal exited" in log and "api exited" in log
