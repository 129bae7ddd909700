"""A small client for the LockN Tune HTTP API, used by the CLI."""

from __future__ import annotations

import time
from pathlib import Path

import httpx


class ApiError(RuntimeError):
    pass


class ApiClient:
    def __init__(self, base_url: str, timeout: float = 60, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def _check(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            if isinstance(detail, list):  # pydantic validation errors: name the field
                detail = "; ".join(f"{'.'.join(map(str, e.get('loc', [])[1:]))}: {e.get('msg')}" for e in detail)
            raise ApiError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {detail}")
        return r.json()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                r = self.http.get("/healthz")
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise ApiError(f"the API at {self.http.base_url} is not healthy: {last}")

    def upload_dataset(self, path: Path, project: str) -> dict:
        with open(path, "rb") as f:
            r = self.http.post(
                "/v1/datasets", params={"project": project}, files={"file": (Path(path).name, f, "application/x-ndjson")}
            )
        return self._check(r)

    def create_run(self, spec: dict) -> dict:
        return self._check(self.http.post("/v1/runs", json=spec))

    def preflight(self, spec: dict) -> dict:
        return self._check(self.http.post("/v1/preflight", json=spec, timeout=360))

    def get_run(self, run_id: str) -> dict:
        return self._check(self.http.get(f"/v1/runs/{run_id}"))

    def list_runs(self, project: str | None = None, state: str | None = None) -> list[dict]:
        params = {k: v for k, v in {"project": project, "state": state}.items() if v}
        return self._check(self.http.get("/v1/runs", params=params))["runs"]

    def pause_run(self, run_id: str) -> dict:
        return self._check(self.http.post(f"/v1/runs/{run_id}/pause"))

    def resume_run(self, run_id: str) -> dict:
        return self._check(self.http.post(f"/v1/runs/{run_id}/resume"))

    def cancel_run(self, run_id: str) -> dict:
        return self._check(self.http.post(f"/v1/runs/{run_id}/cancel"))
