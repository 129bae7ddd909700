"""A throwaway PostgreSQL server on loopback for the tests: initdb into a temporary
directory, start it on a free port, hand out one fresh database per test, stop it at the
end. Uses Debian's `postgresql` package (`make test` and `.ci/run` install it)."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import asyncpg

from tests.stack_process import free_port


def postgres_bindir() -> Path:
    """The directory holding initdb/pg_ctl: PATH first, then Debian's versioned layout."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found. The tests run against a real "
        "PostgreSQL: install Debian's package with `apt-get install -y postgresql` (make test does this when "
        "run as root)."
    )


class PostgresServer:
    """One cluster for the test session; `new_database()` gives each test its own database."""

    def __init__(self):
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="lockn-tune-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "lockn"
        self.password = uuid.uuid4().hex
        # initdb refuses to run as root: run the server as Debian's postgres user then.
        self.run_as = "postgres" if os.geteuid() == 0 else None

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def start(self) -> PostgresServer:
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.run_as:
            os.chown(pwfile, pwd.getpwnam(self.run_as).pw_uid, -1)
        subprocess.run(
            self._cmd("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                      "-E", "UTF8", "--no-sync"),
            check=True, capture_output=True,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                      "start"),
            check=True, capture_output=True,
        )
        return self

    def stop(self) -> None:
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def new_database(self) -> str:
        """Create an empty database; return its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        _run_async(self._admin(f'CREATE DATABASE "{name}"'))
        return self.url(name)


def _run_async(coro) -> None:
    """Run a coroutine to completion from sync code, even when an event loop is running
    in this thread (fixtures of async tests)."""
    import threading

    errors: list[BaseException] = []

    def target():
        try:
            asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]
