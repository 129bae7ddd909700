"""The one source of settings: environment variables prefixed LOCKN_TUNE_.

Every process (API, workers, CLI, `lockn-tune up`) reads the same class, so one
`LOCKN_TUNE_HOME` points them all at the same stack.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCKN_TUNE_", extra="ignore")

    home: Path = Field(Path.home() / ".lockn-tune", description="State of the embedded stack lives here.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file under home.")
    artifacts_dir: Path | None = Field(None, description="Local artifact store root; default: home/artifacts.")

    temporal_address: str = Field("127.0.0.1:7233", description="Temporal frontend host:port.")
    temporal_namespace: str = Field("default")
    temporal_ui_port: int = Field(8233, description="Port of the Temporal UI started by `lockn-tune up`.")
    # Fixed rather than left to the dev server, whose random picks can collide with its own --port.
    temporal_http_port: int | None = Field(None, description="Dev server HTTP API port (default: Temporal port + 10).")
    temporal_metrics_port: int | None = Field(None, description="Dev server metrics port (default: Temporal port + 11).")
    cpu_task_queue: str = Field("lockn-tune-cpu")
    gpu_task_queue: str = Field("lockn-tune-gpu")

    api_host: str = Field("127.0.0.1")
    api_port: int = Field(8420)
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest dataset upload accepted.")

    heartbeat_every_s: float = Field(3.0, description="How often long activities heartbeat while busy.")
    progress_every_s: float = Field(1.0, description="How often training reports step and loss.")
    heartbeat_timeout_s: float = Field(
        30.0, description="A GPU activity silent this long is presumed dead and retried on any GPU worker."
    )
    faults: str = Field("", description="Fault injection for tests (see worker_gpu/faults.py); empty in production.")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'lockn-tune.db'}"

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.home / "artifacts"

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def temporal_ui_url(self) -> str:
        host = self.temporal_address.rsplit(":", 1)[0]
        return f"http://{host}:{self.temporal_ui_port}"

    def run_ui_url(self, run_id: str) -> str:
        return f"{self.temporal_ui_url}/namespaces/{self.temporal_namespace}/workflows/{run_id}"
