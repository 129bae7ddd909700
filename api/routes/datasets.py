"""Datasets: upload (validated, size-limited, content-addressed per project), list, read, delete.

Content-addressed per project: uploading the same bytes to the same project again answers
the dataset already there (same id, one stored copy). Another project gets its own id
(projects are isolated), over the same stored file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path, PurePath

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from activities.dataset_rows import read_dataset
from api.body_limit import BodyTooLarge
from api.deps import DbDep, PrincipalDep, Role, SettingsDep, StoreDep
from schemas.api import DatasetList, DatasetRunRef, DatasetSummary, DatasetView
from schemas.run_spec import SLUG
from schemas.run_state import RunState
from store.db import AsyncDatabase
from store.layout import dataset_key
from store.tables import DatasetRow, RunRow, new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "JSONL file"}},
                }
            },
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def run_refs(runs: list[RunRow]) -> list[DatasetRunRef]:
    return [DatasetRunRef(id=r.id, name=r.name, state=r.state) for r in runs]


async def to_view(db: AsyncDatabase, row: DatasetRow) -> DatasetView:
    runs = (await db.runs_using_datasets([row.id]))[row.id]
    return DatasetView(**row.model_dump(exclude={"store_key"}), runs=run_refs(runs))


async def _receive_file(request: Request, dest: Path) -> tuple[str | None, str]:
    """Write the upload to dest; return the client's file name if it gave one, and the sha256."""
    ctype = request.headers.get("content-type", "")
    digest = hashlib.sha256()
    filename = None
    with open(dest, "wb") as out:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "multipart upload needs a file field named 'file' holding the JSONL dataset")
            while block := await upload.read(1024 * 1024):
                digest.update(block)
                out.write(block)
            filename = upload.filename
        else:
            async for block in request.stream():
                digest.update(block)
                out.write(block)
    return filename, digest.hexdigest()


@router.post(
    "",
    status_code=201,
    response_model=DatasetView,
    openapi_extra=UPLOAD_DOC,
    responses={200: {"model": DatasetView, "description": "The project already holds these bytes: that dataset"}},
)
async def upload_dataset(
    request: Request,
    response: Response,
    settings: SettingsDep,
    db: DbDep,
    store: StoreDep,
    principal: PrincipalDep,
    project: str = Query("default", pattern=SLUG, description="Project the dataset belongs to."),
    name: str | None = Query(None, max_length=200, description="Display name; defaults to the file name."),
) -> DatasetView:
    """Upload a JSONL dataset (chat, instruction or completion rows). It is validated row by
    row; a dataset that is mostly bad is refused with its report (422). The same bytes
    uploaded to the project again answer 200 with the dataset already there (same id).
    Needs operator on the project."""
    principal.require(project, Role.operator, f"project {project!r}")
    tmpdir = settings.home / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmpdir, suffix=".jsonl")
    os.close(fd)
    path = Path(tmp)
    try:
        try:
            filename, sha256 = await _receive_file(request, path)
        except BodyTooLarge:
            raise HTTPException(
                413,
                f"dataset is larger than the upload limit of {settings.max_upload_bytes} bytes; "
                "split it, or raise LOCKN_TUNE_MAX_UPLOAD_BYTES",
            ) from None
        key = dataset_key(sha256)
        existing = await db.dataset_by_sha256(project, sha256)
        if existing is not None:
            # Validated at its first upload; only its stored file may need putting back
            # (deleted meanwhile by the last other project that held the same bytes).
            if not await run_in_threadpool(store.exists, existing.store_key):
                await run_in_threadpool(store.put_file, existing.store_key, path)
            response.status_code = 200
            return await to_view(db, existing)
        # Only the base name is kept, and only for display: storage keys come from the sha256.
        display = name or PurePath((filename or "dataset.jsonl").replace("\\", "/")).name or "dataset.jsonl"
        _, report = await run_in_threadpool(read_dataset, path, source_name=display)
        if report.refused:
            raise HTTPException(422, {"message": report.message, "report": report.model_dump(mode="json")})
        if not await run_in_threadpool(store.exists, key):
            await run_in_threadpool(store.put_file, key, path)
        row = DatasetRow(
            id=new_id("ds"),
            project=project,
            name=display,
            sha256=report.sha256,
            size_bytes=report.size_bytes,
            shape=report.shape.value if report.shape else None,
            total_rows=report.total_rows,
            valid_rows=report.valid_rows,
            bad_rows=report.bad_rows,
            store_key=key,
            report=report.model_dump(mode="json"),
            created_by=principal.subject,
        )
        row, created = await db.add_dataset(row)
        if not created:  # the same bytes, uploaded concurrently
            response.status_code = 200
        return await to_view(db, row)
    finally:
        path.unlink(missing_ok=True)


@router.get("", response_model=DatasetList)
async def list_datasets(
    db: DbDep,
    principal: PrincipalDep,
    project: str | None = Query(None, description="Only datasets of this project."),
    limit: int = Query(100, ge=1, le=1000),
) -> DatasetList:
    """Datasets of the projects the caller can see, newest first, each with the runs that use it."""
    rows = await db.list_datasets(project=project, projects=principal.visible_projects(), limit=limit)
    runs = await db.runs_using_datasets([r.id for r in rows])
    return DatasetList(
        datasets=[DatasetSummary(**r.model_dump(exclude={"store_key", "report"}), runs=run_refs(runs[r.id])) for r in rows]
    )


@router.get("/{dataset_id}", response_model=DatasetView)
async def get_dataset(dataset_id: str, db: DbDep, principal: PrincipalDep) -> DatasetView:
    """A dataset's metadata, validation report and the runs that use it (viewer of its project)."""
    row = await db.get_dataset(dataset_id)
    if row is None:
        raise HTTPException(404, f"dataset {dataset_id!r} not found")
    principal.require(row.project, Role.viewer, f"dataset {dataset_id!r}")
    return await to_view(db, row)


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
async def delete_dataset(dataset_id: str, db: DbDep, store: StoreDep, principal: PrincipalDep) -> Response:
    """Delete a dataset (operator): its record and, unless another project uploaded the same
    bytes, its stored file. Refused (409, naming them) while a run that uses it has not ended.
    Finished runs keep their own snapshot of the data (train/eval split under the run) and
    their lineage (the dataset's sha256), so their adapters stay explained; they cannot be
    started again from this dataset id."""
    row = await db.get_dataset(dataset_id)
    if row is None:
        raise HTTPException(404, f"dataset {dataset_id!r} not found")
    principal.require(row.project, Role.operator, f"dataset {dataset_id!r}")
    active = [r for r in (await db.runs_using_datasets([row.id]))[row.id] if not RunState(r.state).terminal]
    if active:
        names = ", ".join(f"{r.id} ({r.state})" for r in active)
        raise HTTPException(
            409,
            f"dataset {row.id} ({row.name}) is used by runs that have not ended: {names}; "
            "wait for them to finish or cancel them (POST /v1/runs/{id}/cancel), then delete it",
        )
    if await db.delete_dataset(row.id):
        await run_in_threadpool(store.delete_prefix, row.store_key)
    return Response(status_code=204)
