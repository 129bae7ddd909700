"""The artifact store on an S3-compatible bucket (AWS S3, MinIO, Ceph, ...), through `minio`.

Every object carries the sha256 of its bytes as metadata (`x-amz-meta-sha256`), computed
while it is uploaded; reads verify it and raise `ArtifactCorrupt` on a mismatch. Files
larger than one part go up as multipart uploads. A blob that a reader needs as a local
file is downloaded once into `home/cache/sha256/`, named by its sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from pathlib import Path

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

from store.artifacts import CHUNK, ArtifactCorrupt, ArtifactStore, ArtifactStoreError, check_key, sha256_file

SHA256_META = "sha256"  # sent and returned as the header x-amz-meta-sha256
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


class _HashingReader:
    """A file wrapper that hashes what the uploader reads (minio reads parts in order)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        return data


class S3ArtifactStore(ArtifactStore):
    """Artifact store on one bucket, optionally under a key prefix shared with others."""

    def __init__(self, settings):
        self.endpoint, self.bucket = settings.s3_endpoint, settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        if not MIN_PART_SIZE <= settings.s3_part_size <= MAX_PART_SIZE:
            raise ValueError(
                f"LOCKN_TUNE_S3_PART_SIZE is {settings.s3_part_size} bytes; S3 needs parts of at least "
                f"{MIN_PART_SIZE} (5 MiB) and at most {MAX_PART_SIZE} (5 GiB)"
            )
        self.part_size, self.region = settings.s3_part_size, settings.s3_region
        self.cache = Path(settings.home) / "cache" / "sha256"
        # minio's default waits 5 minutes to connect; fail in seconds with a message instead.
        http = urllib3.PoolManager(
            timeout=Timeout(connect=10, read=300),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        try:
            self.client = Minio(
                self.endpoint,
                access_key=settings.s3_access_key or None,
                secret_key=settings.s3_secret_key.get_secret_value() or None,
                secure=settings.s3_secure,
                region=settings.s3_region,
                http_client=http,
            )
        except ValueError as exc:
            raise ValueError(
                f"LOCKN_TUNE_S3_ENDPOINT {self.endpoint!r} is not a valid S3 endpoint ({exc}); give host:port, "
                "without http:// or a path (set LOCKN_TUNE_S3_SECURE=true for HTTPS)"
            ) from None
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        with self._errors("open"):
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket, location=self.region)
                except S3Error as exc:
                    # Another process created it first.
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def object_name(self, key: str) -> str:
        """The object's name in the bucket: the store's prefix, then the key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_name(key)}"

    @contextlib.contextmanager
    def _errors(self, doing: str, key: str | None = None):
        """Turn client failures into errors that say where and what to do. A missing object
        becomes FileNotFoundError, as on the local store."""
        where = self.uri(key) if key else f"bucket {self.bucket!r}"
        failed = f"could not {doing} {where} at S3 endpoint {self.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise FileNotFoundError(f"no artifact {key!r} at {where}") from None
            if exc.code == "NoSuchBucket":
                raise ArtifactStoreError(
                    f"{failed}: bucket {self.bucket!r} does not exist; it is created when a process opens the "
                    "store, so restart the process, or check LOCKN_TUNE_S3_BUCKET"
                ) from None
            if exc.code in CREDENTIAL_CODES:
                raise ArtifactStoreError(
                    f"{failed}: the server refused the credentials ({exc.code}: {exc.message}); check "
                    "LOCKN_TUNE_S3_ACCESS_KEY and LOCKN_TUNE_S3_SECRET_KEY, and that the key may list, read, "
                    f"write and delete in bucket {self.bucket!r}"
                ) from None
            raise ArtifactStoreError(f"{failed}: the server answered {exc.code}: {exc.message}") from None
        except (InvalidResponseError, ServerError) as exc:
            raise ArtifactStoreError(
                f"{failed}: the server did not answer like S3 ({exc}); check LOCKN_TUNE_S3_ENDPOINT and "
                "LOCKN_TUNE_S3_SECURE, and the server's health"
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise ArtifactStoreError(
                f"{failed}: the endpoint is unreachable ({type(exc).__name__}: {exc}); check LOCKN_TUNE_S3_ENDPOINT "
                "(host:port) and LOCKN_TUNE_S3_SECURE, and that the server is up"
            ) from None

    def _verify(self, key: str, expected: str | None, actual: str) -> None:
        # Objects written by other tools may carry no sha256; nothing to check them against.
        if expected and expected != actual:
            raise ArtifactCorrupt(key, self.uri(key), expected, actual)

    def put_file(self, key: str, path: Path) -> str:
        name = self.object_name(key)
        # The metadata goes with the upload's first request, so the sha256 is known first;
        # hashing again while uploading catches a file that changed in between.
        expected = sha256_file(path)
        with self._errors("upload", key), open(path, "rb") as f:
            reader = _HashingReader(f)
            self.client.put_object(
                self.bucket, name, reader, os.fstat(f.fileno()).st_size,
                metadata={SHA256_META: expected}, part_size=self.part_size,
            )
        actual = reader.h.hexdigest()
        if actual != expected:
            with self._errors("remove the torn upload", key):
                self.client.remove_object(self.bucket, name)
            raise OSError(f"{path} changed while it was uploaded to {self.uri(key)}; upload it again once complete")
        return actual

    def put_bytes(self, key: str, data: bytes) -> str:
        name = self.object_name(key)
        sha = hashlib.sha256(data).hexdigest()
        with self._errors("upload", key):
            self.client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), metadata={SHA256_META: sha}, part_size=self.part_size
            )
        return sha

    def _stream(self, key: str, write) -> tuple[str | None, str]:
        """Feed the object's bytes to write; return (sha256 stored with it, sha256 read)."""
        name = self.object_name(key)
        h = hashlib.sha256()
        with self._errors("download", key):
            response = self.client.get_object(self.bucket, name)
            try:
                expected = response.headers.get(f"x-amz-meta-{SHA256_META}")
                for block in response.stream(CHUNK):
                    h.update(block)
                    write(block)
            finally:
                response.close()
                response.release_conn()
        return expected, h.hexdigest()

    def get_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        expected, actual = self._stream(key, buf.write)
        self._verify(key, expected, actual)
        return buf.getvalue()

    def _download(self, key: str, dest: Path) -> str:
        """Write the verified blob to dest atomically; return its sha256."""
        self.object_name(key)  # refuse an unsafe key before touching the disk
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                expected, actual = self._stream(key, f.write)
                f.flush()
                os.fsync(f.fileno())
            self._verify(key, expected, actual)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return actual

    def get_file(self, key: str, dest: Path) -> Path:
        self._download(key, dest)
        return Path(dest)

    def local_file(self, key: str) -> Path:
        """The blob in the local cache, downloaded on first use. Cached files are named by
        their sha256, so a blob rewritten under the same key is fetched again."""
        with self._errors("look up", key):
            stat = self.client.stat_object(self.bucket, self.object_name(key))
        suffix = Path(key).suffix
        expected = (stat.metadata or {}).get(f"x-amz-meta-{SHA256_META}")
        if expected:  # objects written by other tools carry none: those are fetched every time
            cached = self.cache / f"{expected}{suffix}"
            if cached.is_file():
                return cached
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = self.cache / f".download-{uuid.uuid4().hex}"
        try:
            sha = self._download(key, staging)
            cached = self.cache / f"{sha}{suffix}"
            os.replace(staging, cached)
        finally:
            staging.unlink(missing_ok=True)
        return cached

    def exists(self, key: str) -> bool:
        try:
            with self._errors("look up", key):
                self.client.stat_object(self.bucket, self.object_name(key))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        # As on disk: "a" names the blob "a" or everything under "a/", never "ab/...".
        base = check_key(prefix.rstrip("/")) if prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        listed = self.object_name(base) if base else (f"{self.prefix}/" if self.prefix else None)
        keys = []
        with self._errors("list", base or None):
            for obj in self.client.list_objects(self.bucket, prefix=listed, recursive=True):
                key = obj.object_name[strip:]
                if key.endswith("/"):  # folder markers some tools create
                    continue
                if not base or key == base or key.startswith(base + "/"):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        if not keys:
            return 0
        base = prefix.rstrip("/") or None
        with self._errors("delete", base):
            # remove_objects sends DeleteObjects requests of up to 1000 keys; it is lazy, so drain it.
            failed = list(self.client.remove_objects(self.bucket, (DeleteObject(self.object_name(k)) for k in keys)))
        if failed:
            first = failed[0]
            raise ArtifactStoreError(
                f"could not delete {len(failed)} of {len(keys)} objects under "
                f"{self.uri(base) if base else self.bucket} at {self.endpoint}, "
                f"e.g. {first.name}: {first.code} {first.message}; check that the credentials may delete in "
                f"bucket {self.bucket!r}"
            )
        return len(keys)
