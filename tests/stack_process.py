"""A real `lockn-tune up` in a subprocess, on free loopback ports, for CLI and fault tests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent / "lockn-tune"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port below the ephemeral range: the Temporal dev server takes ephemeral
    ports for its internal services when it (re)starts, so a port the OS handed out as
    ephemeral and we released could be taken from the API that is meant to listen on it."""
    low, _ = _ephemeral_range()
    while True:
        port = random.randrange(20000, max(20001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class UpProcess:
    """`lockn-tune up` on its own free ports; `same_ports_as` reuses another one's (the same
    command run again)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, same_ports_as: "UpProcess | None" = None):
        self.home = home
        if same_ports_as is not None:
            self.api, self.temporal, self.ui = same_ports_as.api, same_ports_as.temporal, same_ports_as.ui
            ports = {k: same_ports_as.env[k] for k in ("LOCKN_TUNE_TEMPORAL_HTTP_PORT", "LOCKN_TUNE_TEMPORAL_METRICS_PORT")}
        else:
            self.api, self.temporal, self.ui = free_port(), free_port(), free_port()
            ports = {"LOCKN_TUNE_TEMPORAL_HTTP_PORT": str(free_port()), "LOCKN_TUNE_TEMPORAL_METRICS_PORT": str(free_port())}
        self.env = {**os.environ, **ports, **(env or {})}
        self.url = f"http://127.0.0.1:{self.api}"
        self.proc = None

    def argv(self) -> list[str]:
        return [str(BIN), "up", "--home", str(self.home), "--api-port", str(self.api),
                "--temporal-port", str(self.temporal), "--ui-port", str(self.ui)]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                # Healthy, and ours: an API left by a killed supervisor may answer meanwhile.
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and self._started():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("lockn-tune up never became healthy")

    def _started(self) -> bool:
        try:
            return json.loads((self.home / "stack.json").read_text())["pid"] == self.proc.pid
        except (OSError, ValueError, KeyError):
            return False

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
    """Service name -> pid, as `lockn-tune up` records them in HOME/pids.json."""
    recorded = json.loads((home / "pids.json").read_text())
    return {name: entry["pid"] for name, entry in recorded["services"].items()}


def stack_processes(home: Path) -> dict[str, list[int]]:
    """The live processes of every stack on `home`, by service, found in /proc (the
    supervisor starts each service with its working directory in the home) rather than
    read from pids.json, which is what is under test."""
    home = str(Path(home).resolve())
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") != home or (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        args = [a.decode(errors="replace") for a in argv]
        name = next(
            (svc for svc, mark in (("temporal", "start-dev"), ("api", "uvicorn"), ("worker_cpu", "worker_cpu.main"),
                                   ("worker_gpu", "worker_gpu.main")) if mark in args),
            None,
        )
        if name:
            found.setdefault(name, []).append(int(entry.name))
    return found


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
