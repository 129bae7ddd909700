"""What the `lockn-tune` CLI prints, run as a user runs it (a real process, in a terminal where
it matters) against a real API served over loopback, a real Temporal dev server and real
training on the tiny model.

    .venv/bin/python -m pytest -q tests/cli/test_cli_output.py
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
import yaml

from api.app import create_app
from schemas.run_spec import SLUG
from tests.conftest import small_spec
from tests.stack_process import free_port

ROOT = Path(__file__).resolve().parents[2]
# `python -m cli.main` from the repository root is the `lockn-tune` entry point, run from
# the code this test file sits beside.
CLI = [sys.executable, "-m", "cli.main"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class ServedApi:
    """The API app on a loopback port, in a thread of its own: the CLI is another process."""

    def __init__(self, settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def __aenter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            await asyncio.sleep(0.05)
        raise AssertionError("the API did not start")

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 30)


@pytest_asyncio.fixture
async def served(stack, temporal_env):
    settings = stack.settings.model_copy(
        update={"temporal_address": temporal_env.client.service_client.config.target_host}
    )
    async with ServedApi(settings) as api:
        yield api


def cli_env() -> dict[str, str]:
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "250", "NO_COLOR": "1"}


async def run_cli(api: ServedApi, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI with piped output (as in a script), without blocking the workers' event loop."""
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args, "--api", api.url], cwd=ROOT, env=cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


class TerminalCli:
    """The CLI in a pseudo-terminal, as a person sees it: live progress bar and all."""

    def __init__(self, api: ServedApi, *args: str):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.proc = subprocess.Popen([*CLI, *args, "--api", api.url], cwd=ROOT, env=cli_env(),
                                     stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        self.master, self.raw = master, bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                block = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not block:
                return
            self.raw += block

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    async def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text):
                return m
            assert self.proc.poll() is None, f"CLI exited {self.proc.returncode} before {pattern!r}:\n{self.text[-3000:]}"
            await asyncio.sleep(0.1)
        raise AssertionError(f"never saw {pattern!r}:\n{self.text[-3000:]}")

    async def wait(self, timeout: float = 60) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self.reader.join, 5)
        os.close(self.master)
        return code


@pytest.fixture
def terminal():
    """Start CLIs in terminals; whatever a failed test left running is killed."""
    started: list[TerminalCli] = []

    def start(api: ServedApi, *args: str) -> TerminalCli:
        started.append(TerminalCli(api, *args))
        return started[-1]

    yield start
    for cli in started:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait(10)


def bracketed_dataset(src: Path, dest: Path) -> Path:
    """The demo rows with markup-like brackets in every prompt, as real data has ([INST], [a-z])."""
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for row in rows:
        row["instruction"] = f"[bold]{row['instruction']}[/bold] (match [a-z])"
        row["output"] = f"[i]{row['output']}[/i]"
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


async def test_errors_print_brackets_literally(served, tmp_path):
    # A real API error whose message quotes the user's text with brackets in it.
    r = await run_cli(served, "runs", "show", "run_[a-z][bold]x")
    assert r.returncode == 1
    assert "error: GET /v1/runs/run_[a-z][bold]x -> 404: run 'run_[a-z][bold]x' not found" in r.stdout, r.stdout
    # The issue's own example: a spec field's pattern, as the validation error gives it.
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"project": "Not A Slug", "base_model": "m", "dataset": "d.jsonl"}))
    r = await run_cli(served, "tune", str(spec))
    assert r.returncode == 1
    assert f"project: String should match pattern '{SLUG}'" in r.stdout and "[a-z0-9]" in SLUG, r.stdout


async def test_tune_progress_ctrl_c_then_follow_to_the_samples(served, terminal, tiny_model, datasets, tmp_path):
    api = httpx.AsyncClient(base_url=served.url, timeout=60)
    data = bracketed_dataset(datasets["instruction"], tmp_path / "brackets.jsonl")
    # 100 steps: about 2 s of training on an idle 2-core machine, so the bar is seen mid-run.
    spec = small_spec(tiny_model, data, name="[bold]tiny[/bold]", checkpoint_every_steps=100,
                      eval_at_checkpoints=False, hyperparameters={"max_steps": 100})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))

    tune = terminal(served, "tune", str(spec_file))
    run_id = (await tune.wait_for(r"run (run_\w+) submitted")).group(1)
    # Paused before its first training step, so it is certainly still going when Ctrl-C comes.
    assert (await api.post(f"/v1/runs/{run_id}/pause")).status_code == 202
    await tune.wait_for(r"paused: ")  # the state change printed above the bar (which shows no colon)
    report = (await api.get(f"/v1/runs/{run_id}/preflight")).json()
    assert report["warnings"], "this spec should draw a preflight warning"
    for warning in report["warnings"]:
        assert f"warning: {warning}" in tune.text

    tune.proc.send_signal(signal.SIGINT)
    assert await tune.wait() == 130
    assert f"run {run_id} goes on on the server" in tune.text
    assert f"lockn-tune runs follow {run_id}" in tune.text and f"lockn-tune runs cancel {run_id}" in tune.text
    assert "Traceback" not in tune.text

    # Reattach to the paused run, resume it, and follow it to its end.
    follow = terminal(served, "runs", "follow", run_id)
    await follow.wait_for(rf"following {run_id} \(\[bold\]tiny\[/bold\], paused\)")
    assert (await api.post(f"/v1/runs/{run_id}/resume")).status_code == 202
    # The live bar: step/total, loss, steps/s, the worker's measured tokens/s and an ETA, while training.
    await follow.wait_for(
        r"training\s.*\d+/100 steps  loss \d+\.\d{4}  \d+\.\d\d steps/s  [\d,]+ tok/s  ETA \d\d:\d\d:\d\d  elapsed"
    )
    assert await follow.wait(240) == 0, follow.text[-3000:]
    out = follow.text
    assert f"run {run_id} succeeded" in out and "tuned eval loss" in out
    run = (await api.get(f"/v1/runs/{run_id}")).json()
    samples = run["metrics"]["tuned"]["samples"]
    assert "eval samples: base vs tuned" in out
    for header in ("prompt", "reference", "base model", "tuned"):
        assert header in out
    # Brackets in the data come out as written, not eaten as markup.
    assert any(s["reference"] in out for s in samples if s["reference"].startswith("[i]")), out

    # A finished run: the summary at once.
    started = time.monotonic()
    again = await run_cli(served, "runs", "follow", run_id)
    assert again.returncode == 0 and f"run {run_id} succeeded" in again.stdout
    assert "following" not in again.stdout and time.monotonic() - started < 15
    await api.aclose()


async def test_datasets_list_and_delete(served, tiny_model, datasets):
    api = httpx.AsyncClient(base_url=served.url, timeout=60)
    ds = (await api.post("/v1/datasets", params={"project": "tests"},
                         files={"file": ("greet [v1].jsonl", datasets["chat"].read_bytes())})).json()
    run = (await api.post("/v1/runs", json=small_spec(tiny_model, ds["id"]).model_dump(mode="json"))).json()

    listed = await run_cli(served, "datasets", "list", "--project", "tests")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    line = next(line for line in listed.stdout.splitlines() if ds["id"] in line)
    assert "greet [v1].jsonl" in line and "120/120" in line and "1 (1 not ended)" in line

    # Refused while the run uses it, with the API's reason word for word.
    refused = await run_cli(served, "datasets", "delete", ds["id"])
    assert refused.returncode == 1
    reason = (await api.delete(f"/v1/datasets/{ds['id']}")).json()["detail"]
    assert f"-> 409: {reason}" in refused.stdout and run["id"] in reason, refused.stdout

    assert (await run_cli(served, "runs", "cancel", run["id"])).returncode == 0
    for _ in range(300):
        if (await api.get(f"/v1/runs/{run['id']}")).json()["state"] == "cancelled":
            break
        await asyncio.sleep(0.2)
    deleted = await run_cli(served, "datasets", "delete", ds["id"])
    assert deleted.returncode == 0 and f"dataset {ds['id']} deleted" in deleted.stdout, deleted.stdout
    after = await run_cli(served, "datasets", "list", "--project", "tests")
    assert ds["id"] not in after.stdout and "no datasets in project tests" in after.stdout
    await api.aclose()
