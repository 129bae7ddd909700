"""The allowed roots on a real `lockn-tune up`: the setting reaches the API and the workers,
paths outside it are refused and never read, and the CLI still works from any folder."""

from __future__ import annotations

import json
import time

import httpx
import yaml

from activities.demo_data import write_demo_dataset
from tests.stack_process import UpProcess

MARKER = "SECRET-51d0e2-DO-NOT-LEAK"


def post_preflight(url: str, body: dict) -> httpx.Response:
    """POST /v1/preflight, riding out the seconds before the GPU worker first polls (503)."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(f"{url}/v1/preflight", json=body, timeout=120)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def test_up_passes_the_roots_to_its_services_and_the_cli_uploads_from_anywhere(tmp_path, tiny_model):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.jsonl"
    secret.write_text("".join(json.dumps({"instruction": f"{MARKER} {i}", "output": MARKER}) + "\n" for i in range(60)))
    data = write_demo_dataset(outside / "data.jsonl", rows=120)
    home = tmp_path / "home"
    up = UpProcess(home, env={"LOCKN_TUNE_ALLOWED_ROOTS": str(tiny_model.parent)})  # not tmp_path
    up.start()
    try:
        spec = {"project": "roots", "name": "r", "base_model": str(tiny_model), "dataset": str(secret),
                "hyperparameters": {"max_steps": 4, "max_seq_len": 96}}
        r = post_preflight(up.url, spec)
        assert r.status_code == 422 and MARKER not in r.text, r.text
        detail = r.json()["detail"]
        assert "outside the folders this server reads" in detail and str(tiny_model.parent) in detail
        assert str(home.resolve()) in detail  # the home is always a root

        # The model's folder is allowed in worker_cpu too (it resolves the model), and the CLI
        # uploads a dataset from a folder that is not a root.
        spec_file = outside / "spec.yaml"
        spec_file.write_text(yaml.safe_dump({**spec, "dataset": str(data)}))
        deadline = time.monotonic() + 60
        pre = up.cli("preflight", str(spec_file))
        while "no GPU worker is running" in pre.stdout and time.monotonic() < deadline:  # not polled yet
            time.sleep(0.5)
            pre = up.cli("preflight", str(spec_file))
        assert pre.returncode == 0 and "preflight ok" in pre.stdout, pre.stdout + pre.stderr
        assert "uploaded as ds_" in pre.stdout
    finally:
        assert up.stop() == 0
    logs = "".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file())
    assert logs and MARKER not in logs
