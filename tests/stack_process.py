"""A real `lockn-tune up` in a subprocess, on free loopback ports, for CLI and fault tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent / "lockn-tune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UpProcess:
    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.home = home
        self.api, self.temporal, self.ui = free_port(), free_port(), free_port()
        ports = {"LOCKN_TUNE_TEMPORAL_HTTP_PORT": str(free_port()), "LOCKN_TUNE_TEMPORAL_METRICS_PORT": str(free_port())}
        self.env = {**os.environ, **ports, **(env or {})}
        self.url = f"http://127.0.0.1:{self.api}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN), "up", "--home", str(self.home), "--api-port", str(self.api),
             "--temporal-port", str(self.temporal), "--ui-port", str(self.ui)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("lockn-tune up never became healthy")

    def stop(self, timeout: float = 200) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN), *args, "--api", self.url], capture_output=True, text=True, timeout=300)


def wait_run(url: str, run_id: str, predicate, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_json(f"{url}/v1/runs/{run_id}")
        if predicate(run):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} stuck in {run['state']}: {run.get('error')}")



def pids(home: Path) -> dict[str, int]:
    return json.loads((home / "pids.json").read_text())


def get_json(url: str, timeout: float = 60):
    """GET that rides out a restarting API."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code < 500:
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer for {timeout}s")
        time.sleep(0.3)
