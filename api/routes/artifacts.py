"""Artifacts: a published adapter's record and lineage manifest."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.deps import DbDep, PrincipalDep, Role
from schemas.api import ArtifactDetail

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get("/{artifact_id}", response_model=ArtifactDetail)
async def get_artifact(artifact_id: str, db: DbDep, principal: PrincipalDep) -> ArtifactDetail:
    """Where the artifact is, its sha256 and its lineage manifest (viewer of the run's project)."""
    row = await db.get_artifact(artifact_id)
    run = await db.get_run(row.run_id) if row else None
    if row is None or run is None:
        raise HTTPException(404, f"artifact {artifact_id!r} not found")
    principal.require(run.project, Role.viewer, f"artifact {artifact_id!r}")
    return ArtifactDetail(**row.model_dump(), project=run.project)
