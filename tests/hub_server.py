"""A loopback server that speaks the Hugging Face Hub's HTTP protocol, for tests.

    with HubServer() as hub:
        sha = hub.add_repo("org/tiny", files)       # files: {name: bytes}, or a directory
        snapshot_download("org/tiny", endpoint=hub.url, ...)

It serves what huggingface_hub 0.36 asks for in `model_info` / `repo_info`,
`hf_hub_download` and `snapshot_download`:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   sha, siblings (size, blobId, lfs)
    HEAD /{repo}/resolve/{rev}/{file}                        X-Repo-Commit, ETag, Content-Length;
                                                             LFS files (*.safetensors): 302 to /cdn/{sha256}
                                                             with X-Linked-Etag and X-Linked-Size, as the Hub does
    GET  /{repo}/resolve/{rev}/{file}, GET|HEAD /cdn/{sha256}  the bytes, with Range (206, Content-Range)

and the Hub's errors, which `hf_raise_for_status` maps by their X-Error-Code header:
404 RepoNotFound (RepositoryNotFoundError), 404 RevisionNotFound (RevisionNotFoundError),
404 EntryNotFound, and for a gated repo 401 (no token) or 403 (a token without access) with
GatedRepo (GatedRepoError). `drop_once(file)` makes the next download of a file stop halfway
and close the connection, as a network failure would. Every request is logged in `requests`.
The server thread is a daemon and `with` stops it, so it never outlives the test.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_sha1(data: bytes) -> str:
    """What the Hub sends as a regular (non-LFS) file's ETag: its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    files: dict[str, bytes]
    sha: str
    refs: dict[str, str]  # branch or tag -> commit sha
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens whose account accepted the gated repo's terms

    def commit(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return self.sha if len(revision) >= 7 and self.sha.startswith(revision) else None

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


@dataclass
class HubRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class HubServer:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[HubRequest] = field(default_factory=list)
    _drops: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        branches: tuple[str, ...] = ("main",),
        gated: bool = False,
        tokens: tuple[str, ...] = (),
    ) -> str:
        """Serve a repo of these files (or of every file under a directory) at one commit,
        which each branch points to; return the commit sha."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(f"{name}:{git_blob_sha1(files[name])}\n".encode())
        sha = h.hexdigest()
        self.repos[repo_id] = HubRepo(dict(files), sha, {b: sha for b in branches}, gated, frozenset(tokens))
        return sha

    def drop_once(self, name: str) -> None:
        """The next GET of this file's bytes sends half of them and closes the connection."""
        with self._lock:
            self._drops.add(name)

    def take_drop(self, name: str) -> bool:
        with self._lock:
            if name in self._drops:
                self._drops.discard(name)
                return True
            return False

    def log(self, req: HubRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def blob(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if repo.is_lfs(name) and hashlib.sha256(data).hexdigest() == sha256:
                    return name, data
        return None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@contextmanager
def online_hub(monkeypatch) -> Iterator[HubServer]:
    """A running HubServer, with huggingface_hub online for this test only (conftest sets
    HF_HUB_OFFLINE=1 for the rest) and small read chunks, so a file cut short halfway has
    bytes on disk to resume from (the client writes whole 10 MB chunks by default)."""
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    reset_sessions()  # sessions made while offline refuse every request
    try:
        with HubServer() as server:
            yield server
    finally:
        reset_sessions()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as requests' sessions use it

        def log_message(self, *args) -> None:  # quiet: the tests read hub.requests instead
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            hub.log(HubRequest(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
            url = urlsplit(self.path)
            path = url.path
            if path.startswith("/api/models/"):
                return self._model_info(path[len("/api/models/") :], parse_qs(url.query))
            if path.startswith("/cdn/"):
                found = hub.blob(path[len("/cdn/") :])
                if found is None:
                    return self._error(404, "EntryNotFound", "Entry not found")
                name, data = found
                return self._bytes(name, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
            if "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                revision, _, name = rest.partition("/")
                return self._resolve(unquote(repo_id), unquote(revision), unquote(name), body)
            self._error(404, None, "Not found")

        def _repo(self, repo_id: str, revision: str | None) -> tuple[HubRepo, str] | None:
            """The repo and the commit a revision names, or None after sending the Hub's error."""
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            sha = repo.commit(revision or "main")
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, sha

        def _model_info(self, rest: str, query: dict) -> None:
            repo_id, _, revision = rest.partition("/revision/")
            found = self._repo(unquote(repo_id), unquote(revision) if revision else None)
            if found is None:
                return
            repo, sha = found
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for name, data in sorted(repo.files.items()):
                sib: dict = {"rfilename": name}
                if blobs:
                    sib.update(size=len(data), blobId=git_blob_sha1(data))
                    if repo.is_lfs(name):
                        sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(sib)
            info = {
                "_id": sha[:24],
                "id": unquote(repo_id),
                "modelId": unquote(repo_id),
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "tags": [],
                "siblings": siblings,
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, sha = found
            if repo.gated:
                auth = self.headers.get("Authorization") or ""
                token = auth.removeprefix("Bearer ").strip()
                if not token:
                    return self._error(
                        401, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.",
                        {"X-Repo-Commit": sha},
                    )
                if token not in repo.tokens:
                    return self._error(
                        403, "GatedRepo",
                        f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                        f"Visit https://huggingface.co/{repo_id} to ask for access.",
                        {"X-Repo-Commit": sha},
                    )
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
            data = repo.files[name]
            if repo.is_lfs(name):
                digest = hashlib.sha256(data).hexdigest()
                headers = {
                    "X-Repo-Commit": sha,
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(data)}"',
                    "Location": f"{hub.url}/cdn/{digest}",
                }
                return self._send(302, b"", headers, body)
            self._bytes(name, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}, body)

        def _bytes(self, name: str, data: bytes, headers: dict, body: bool) -> None:
            """A file's bytes, or the part a Range header asks for."""
            status, start = 200, 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted[len("bytes=") :].partition("-")
                start = int(first) if first else 0
                end = int(last) if last else len(data) - 1
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
                data, status = data[start : end + 1], 206
            headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if body and hub.take_drop(name):
                # The whole length is announced, half is sent, then the connection closes.
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(status, data, headers, body)

        def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
            extra = {"X-Error-Message": message, **(headers or {})}
            if code:
                extra["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), {"Content-Type": "application/json", **extra}, True)

        def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(data)

    return Handler
