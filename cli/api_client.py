"""A small client for the LockN Tune HTTP API, used by the CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx


class ApiError(RuntimeError):
    pass


class ApiUnreachable(ApiError):
    """Nothing answers at the API's address: a message for a person, not a traceback."""


class _Http(httpx.Client):
    """httpx, with a refused or timed-out connection turned into ApiUnreachable for every
    request (streams included), so no command shows a ConnectError traceback."""

    def __init__(self, *, unreachable, **kwargs):
        super().__init__(**kwargs)
        self._unreachable = unreachable

    def send(self, request, **kwargs):
        try:
            return super().send(request, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiUnreachable(self._unreachable(exc)) from None


class ApiClient:
    """The API at `base_url`. `source` says where that address came from and `start_hint`
    how to start a stack there; both go into the message when nothing answers."""

    def __init__(
        self, base_url: str, timeout: float = 60, token: str | None = None,
        source: str = "", start_hint: str = "start the stack with `lockn-tune up` (or `make up`)",
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url, self.source, self.start_hint = base_url, source, start_hint
        self.http = _Http(base_url=base_url, timeout=timeout, headers=headers, unreachable=self._unreachable)

    def _unreachable(self, exc: Exception) -> str:
        reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or type(exc).__name__
        source = f" ({self.source})" if self.source else ""
        return f"cannot reach the LockN Tune API at {self.base_url}{source}: {reason}.\n{self.start_hint}"

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
            except (httpx.HTTPError, ApiUnreachable) as exc:  # not up yet: keep waiting
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

    def run_events(self, run_id: str, after: int = 0) -> list[dict]:
        """The run's events after event id `after` (state changes, progress, warnings), oldest
        first: one window of the SSE stream, read without following."""
        r = self.http.get(
            f"/v1/runs/{run_id}/events", params={"follow": "false"}, headers={"Last-Event-ID": str(after)}
        )
        if r.status_code >= 400:
            self._check(r)
        events = []
        for block in r.text.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
            if "data" in fields and fields.get("event") != "end":
                events.append(json.loads(fields["data"]))
        return events

    def list_datasets(self, project: str | None = None) -> list[dict]:
        params = {"project": project} if project else {}
        body = self._check(self.http.get("/v1/datasets", params=params))
        return body["datasets"] if isinstance(body, dict) else body

    def delete_dataset(self, dataset_id: str) -> None:
        r = self.http.delete(f"/v1/datasets/{dataset_id}")
        if r.status_code >= 400:
            self._check(r)
