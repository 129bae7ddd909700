"""The one source of settings: environment variables prefixed LOCKN_TUNE_.

Every process (API, workers, CLI, `lockn-tune up`) reads the same class, so one
`LOCKN_TUNE_HOME` points them all at the same stack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def hardware_task_queue_for(gpu_task_queue: str) -> str:
    """The light task queue every worker_gpu also polls for hardware reports, so they never
    wait behind training on the GPU queue. Workflows derive it with this one function too."""
    return f"{gpu_task_queue}-hardware"


def no_gpu_worker_message(gpu_task_queue: str, waited_s: float | None = None) -> str:
    """What to say when no GPU worker answers: which queue, and how to start one."""
    waited = f" within {waited_s:g} s" if waited_s else ""
    return (
        f"no GPU worker is running: nothing answered{waited} on task queue "
        f"{hardware_task_queue_for(gpu_task_queue)!r} (worker_gpu serves it beside {gpu_task_queue!r}). "
        f"Start one with `lockn-tune up`, or `python -m worker_gpu.main` with LOCKN_TUNE_GPU_TASK_QUEUE={gpu_task_queue} "
        "and the same LOCKN_TUNE_TEMPORAL_ADDRESS as the API"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCKN_TUNE_", extra="ignore")

    home: Path = Field(Path.home() / ".lockn-tune", description="State of the embedded stack lives here.")

    # Metadata DB
    database_url: str | None = Field(
        None,
        description="sqlite:///path or postgresql://user:password@host:port/db (driven through asyncpg); "
        "default: SQLite file under home.",
    )
    db_auto_migrate: bool = Field(True, description="Run Alembic migrations to head when a process opens the DB.")

    # Artifact store
    artifact_store: Literal["local", "s3"] = Field("local", description="Where artifacts live: local disk or S3/MinIO.")
    artifacts_dir: Path | None = Field(None, description="Local artifact store root; default: home/artifacts.")
    s3_endpoint: str = Field("127.0.0.1:9000", description="S3/MinIO endpoint host:port.")
    s3_bucket: str = Field("lockn-tune", description="Bucket holding every artifact; created if missing.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket, for sharing one bucket.")
    s3_access_key: str = Field("", description="S3 access key id.")
    s3_secret_key: SecretStr = Field(SecretStr(""), description="S3 secret key.")
    s3_region: str | None = Field(None, description="S3 region, where the server wants one.")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 endpoint.")
    s3_part_size: int = Field(16 * 1024 * 1024, description="Multipart upload part size in bytes (at least 5 MiB).")

    # Auth (OIDC bearer tokens as Auth0 issues them)
    auth_enabled: bool = Field(False, description="Off: one local user with admin on every project (embedded).")
    oidc_issuer: str | None = Field(None, description="Token issuer, e.g. https://your-tenant.auth0.com/")
    oidc_audience: str | None = Field(None, description="Expected audience: the Auth0 API identifier.")
    oidc_jwks_url: str | None = Field(None, description="JWKS address; default: <issuer>.well-known/jwks.json")
    oidc_roles_claim: str = Field(
        "permissions",
        description="Claim holding project roles as 'project:<project>:<role>' strings (Auth0 RBAC 'permissions') "
        "or a namespaced claim such as https://lockn.dev/roles.",
    )
    oidc_leeway_s: int = Field(30, description="Clock skew allowed on exp/nbf/iat.")
    api_token: SecretStr = Field(SecretStr(""), description="Bearer token the `lockn-tune` CLI sends when auth is on.")

    # Observability
    log_json: bool = Field(False, description="JSON log lines (production) instead of key=value (terminal).")
    log_level: str = Field("INFO")
    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318")
    worker_cpu_metrics_port: int | None = Field(None, description="Prometheus port of worker_cpu (off when unset).")
    worker_gpu_metrics_port: int | None = Field(None, description="Prometheus port of worker_gpu (off when unset).")
    sdk_metrics_port: int | None = Field(
        None, description="Temporal SDK metrics port for a worker (each process binds port + 0/1: cpu, gpu)."
    )

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
    # A string, not a list: `lockn-tune up` hands settings to its children as str(value).
    allowed_roots: str = Field(
        "",
        description="Folders, separated by ':' (os.pathsep), from which a spec may name local datasets and base "
        "models, besides home and the Hugging Face hub cache, which are always allowed; any other server path is "
        "refused (upload the dataset instead).",
    )

    # Hugging Face Hub
    hf_token: SecretStr = Field(
        SecretStr(""),
        description="Hugging Face token the workers send when fetching base models (gated or private repos); "
        "empty: huggingface_hub's own (HF_TOKEN or `hf auth login`).",
    )
    hf_endpoint: str | None = Field(
        None, description="Hugging Face Hub address (a mirror, say); default: huggingface_hub's own (HF_ENDPOINT)."
    )

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
    def hardware_task_queue(self) -> str:
        return hardware_task_queue_for(self.gpu_task_queue)

    @property
    def allowed_root_paths(self) -> list[Path]:
        """allowed_roots as folders, as written (activities/local_paths.py resolves them)."""
        return [Path(p.strip()) for p in self.allowed_roots.split(os.pathsep) if p.strip()]

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
