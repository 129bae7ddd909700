"""The artifact store: named blobs (dataset snapshots, checkpoints, adapters, manifests).

One interface, `ArtifactStore`; the local-filesystem implementation is the embedded
default and the S3-compatible one (`store/s3.py`) sits behind the same methods. Every
write is atomic (temporary name then rename, or one S3 object), so a reader never sees
half a file; multi-file objects such as checkpoints are committed by writing their
manifest last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class UnsafeKey(ValueError):
    pass


class ArtifactCorrupt(Exception):
    """A blob's bytes do not match the sha256 recorded when it was stored."""

    def __init__(self, key: str, where: str, expected: str, actual: str):
        self.key, self.where, self.expected, self.actual = key, where, expected, actual
        super().__init__(
            f"artifact {key!r} at {where} is corrupt: it was stored with sha256 {expected} but reads as {actual}; "
            "write it again (rerun the step that produced it) or delete it"
        )


class ArtifactStoreError(RuntimeError):
    """The store itself failed (unreachable, credentials refused, bucket missing), not one blob.
    Not an OSError, so callers never mistake an outage for a missing blob."""


def check_key(key: str) -> str:
    """Keys are relative POSIX paths without '..', so no key can escape the store."""
    p = PurePosixPath(key)
    if not key or p.is_absolute() or any(part in ("..", "") for part in key.split("/")) or "\\" in key:
        raise UnsafeKey(f"artifact key {key!r} is not a safe relative path")
    return key


class ArtifactStore(ABC):
    """Named blobs. Keys look like `runs/<run>/checkpoints/000000050/manifest.json`."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> str:
        """Store a file under key; return its sha256."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Store bytes under key; return their sha256."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> Path:
        """Copy the blob at key to dest (atomically) and return dest."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under prefix, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under prefix; return how many."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """An address a person or another tool can use for the blob."""

    def local_path(self, key: str) -> Path | None:
        """The blob's path on this machine, where the store is local."""
        return None

    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A file on this machine holding the blob, for readers that need a path: the blob
        itself where the store is local, else a verified copy in a cache. Treat it as read-only."""


class LocalArtifactStore(ArtifactStore):
    """Artifact store on a local directory."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(self, key: str, write) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                write(f, h)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return h.hexdigest()

    def put_file(self, key: str, path: Path) -> str:
        def write(f, h):
            with open(path, "rb") as src:
                while block := src.read(CHUNK):
                    h.update(block)
                    f.write(block)

        return self._atomic_write(key, write)

    def put_bytes(self, key: str, data: bytes) -> str:
        def write(f, h):
            h.update(data)
            f.write(data)

        return self._atomic_write(key, write)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def get_file(self, key: str, dest: Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        shutil.copyfile(self._path(key), tmp)
        os.replace(tmp, dest)
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and ".tmp-" not in p.name
        ]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self._path(k).unlink(missing_ok=True)
        return len(keys)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def local_file(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no artifact {key!r} at {self.uri(key)}")
        return path

