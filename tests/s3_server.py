"""A throwaway S3-protocol server on loopback for the tests: moto's standalone server
(`moto_server`, from the `moto[server]` dev dependency) in its own process on a free port,
speaking real S3 over HTTP. `settings(home)` hands each caller its own fresh bucket.

    server = S3Server().start()
    settings = server.settings(tmp_path / "home")   # artifact_store="s3", a new bucket
    server.stop()
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from schemas.settings import Settings
from tests.stack_process import free_port

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
READY_TIMEOUT_S = 30.0


class S3Server:
    """One moto server for the test session; any access key is accepted, so the keys here
    only have to be consistent."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.host = "127.0.0.1"
        self.port = 0
        self.access_key = "lockn-test"
        self.secret_key = uuid.uuid4().hex
        self.region = "us-east-1"
        self.process: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix="lockn-tune-s3-", suffix=".log")
        os.close(fd)
        self.log = Path(log)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> S3Server:
        # The free port can be taken between the probe and the bind; try another then.
        for _ in range(3):
            self.port = free_port()
            cmd = [str(MOTO_SERVER), "-H", self.host, "-p", str(self.port)]
            if not MOTO_SERVER.exists():
                cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    env=self.env,
                )
            if self._wait_ready():
                atexit.register(self.stop)  # also when the session dies before its teardown
                return self
            self._terminate()
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"moto_server did not start on 127.0.0.1 (is moto[server] installed?); {self.log}:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # Any HTTP answer (ListBuckets, or an error where auth is on) means it is serving.
                with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop the server and remove its log."""
        self._terminate()
        self.log.unlink(missing_ok=True)

    def _terminate(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL if it lingers."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            proc.wait(timeout=10)

    def settings(self, home: Path, **overrides) -> Settings:
        """Settings whose artifact store is a fresh bucket on this server (created on open)."""
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        values = {
            "home": home,
            "artifact_store": "s3",
            "s3_endpoint": self.endpoint,
            "s3_bucket": f"lockn-test-{uuid.uuid4().hex[:12]}",
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_region": self.region,
            "s3_secure": False,
        }
        values.update(overrides)
        return Settings(**values)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
