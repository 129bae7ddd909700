"""`lockn-tune up` and the CLI as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import subprocess

import httpx
import yaml

from activities.demo_data import write_demo_dataset
from tests.stack_process import BIN, UpProcess, wait_run


def test_make_tiny_cli_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run([str(BIN), "models", "make-tiny", str(out), "--arch", "qwen2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(out).chat_template
    bad = subprocess.run([str(BIN), "models", "make-tiny", str(tmp_path / "x"), "--arch", "gpt9"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown arch 'gpt9'" in bad.stdout


def test_up_tune_stop_and_restart_continues_the_run(tmp_path, tiny_model):
    up = UpProcess(tmp_path / "home")
    up.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{up.ui}/", timeout=5).status_code == 200  # Temporal UI
        data = write_demo_dataset(tmp_path / "data.jsonl", rows=120)
        spec = {
            "project": "cli", "name": "cli-run", "base_model": str(tiny_model), "dataset": str(data),
            "checkpoint_every_steps": 10,
            "hyperparameters": {"max_steps": 20, "learning_rate": 3e-3, "max_seq_len": 96, "micro_batch_size": 8, "grad_accum": 1},
        }
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        r = up.cli("tune", str(spec_file))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "succeeded" in r.stdout and "tuned eval loss" in r.stdout and "uploaded as ds_" in r.stdout
        listed = up.cli("runs", "list", "--project", "cli")
        assert "succeeded" in listed.stdout
        first_id = r.stdout.split("run ")[1].split()[0]
        shown = up.cli("runs", "show", first_id, "--json")
        assert json.loads(shown.stdout)["state"] == "succeeded"
        again = up.cli("runs", "cancel", first_id)
        assert again.returncode == 1 and "already ended (succeeded)" in again.stdout

        pre = up.cli("preflight", str(spec_file))
        assert pre.returncode == 0 and "preflight ok" in pre.stdout, pre.stdout + pre.stderr
        assert "as the model sees it" in pre.stdout and "memory: needs" in pre.stdout

        bad_spec = tmp_path / "bad.yaml"
        bad_spec.write_text(yaml.safe_dump({**spec, "method": "full", "hyperparameters": {"lr": 1}}))
        r = up.cli("tune", str(bad_spec))
        assert r.returncode == 1 and "method" in r.stdout and "hyperparameters.lr" in r.stdout

        # A long run, interrupted by stopping the whole stack mid-training.
        long_spec = tmp_path / "long.yaml"
        long_spec.write_text(yaml.safe_dump({**spec, "name": "long", "hyperparameters": {**spec["hyperparameters"], "max_steps": 300}, "checkpoint_every_steps": 50}))
        r = up.cli("tune", str(long_spec), "--no-follow")
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = r.stdout.split("run ")[-1].split()[0]
        wait_run(up.url, run_id, lambda run: run["state"] == "training" and run["step"] >= 20)
        paused = up.cli("runs", "pause", run_id)
        assert paused.returncode == 0 and "pause requested" in paused.stdout, paused.stdout + paused.stderr
        wait_run(up.url, run_id, lambda run: run["state"] == "paused")
        resumed = up.cli("runs", "resume", run_id)
        assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stdout + resumed.stderr
        wait_run(up.url, run_id, lambda run: run["state"] == "training" and run["step"] >= 60)
    finally:
        code = up.stop()
    assert code == 0
    out = up.proc.stdout.read()
    assert "stopping" in out

    up2 = UpProcess(up.home)
    up2.start()
    try:
        done = wait_run(up2.url, run_id, lambda run: run["state"] in ("succeeded", "failed", "cancelled"))
        assert done["state"] == "succeeded", done.get("error")
        assert done["step"] == 300
        events = httpx.get(f"{up2.url}/v1/runs/{run_id}/events", params={"follow": "false"}).text
        # It went on from the checkpoint the clean stop committed, not from step 0.
        assert "restarted from step 0" not in events
    finally:
        assert up2.stop() == 0
