"""Which artifact store the settings name: local disk, or an S3-compatible bucket.

Above both implementations (store/artifacts.py, store/s3.py), so neither imports the other's importer.
"""

from __future__ import annotations

from store.artifacts import ArtifactStore, LocalArtifactStore


def open_store(settings) -> ArtifactStore:
    """The artifact store the settings name: local disk, or an S3-compatible bucket."""
    if settings.artifact_store == "s3":
        from store.s3 import S3ArtifactStore  # minio is only needed when the store is S3

        return S3ArtifactStore(settings)
    return LocalArtifactStore(settings.artifacts_root)
