"""Datasets: upload (validated, size-limited, content-addressed) and read back."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePath

from fastapi import APIRouter, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from activities.dataset_rows import read_dataset
from api.body_limit import BodyTooLarge
from api.deps import DbDep, PrincipalDep, Role, SettingsDep, StoreDep
from schemas.api import DatasetView
from schemas.run_spec import SLUG
from store.db import DatasetRow, new_id

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


def to_view(row: DatasetRow) -> DatasetView:
    return DatasetView(**row.model_dump(exclude={"store_key"}))


async def _receive_file(request: Request, dest: Path) -> str | None:
    """Write the upload to dest; return the client's file name if it gave one."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "multipart upload needs a file field named 'file' holding the JSONL dataset")
        with open(dest, "wb") as out:
            while block := await upload.read(1024 * 1024):
                out.write(block)
        return upload.filename
    with open(dest, "wb") as out:
        async for block in request.stream():
            out.write(block)
    return None


@router.post("", status_code=201, response_model=DatasetView, openapi_extra=UPLOAD_DOC)
async def upload_dataset(
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    store: StoreDep,
    principal: PrincipalDep,
    project: str = Query("default", pattern=SLUG, description="Project the dataset belongs to."),
    name: str | None = Query(None, max_length=200, description="Display name; defaults to the file name."),
) -> DatasetView:
    """Upload a JSONL dataset (chat, instruction or completion rows). It is validated row by
    row; a dataset that is mostly bad is refused with its report (422). Needs operator on the project."""
    principal.require(project, Role.operator, f"project {project!r}")
    tmpdir = settings.home / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmpdir, suffix=".jsonl")
    os.close(fd)
    path = Path(tmp)
    try:
        try:
            filename = await _receive_file(request, path)
        except BodyTooLarge:
            raise HTTPException(
                413,
                f"dataset is larger than the upload limit of {settings.max_upload_bytes} bytes; "
                "split it, or raise LOCKN_TUNE_MAX_UPLOAD_BYTES",
            ) from None
        # Only the base name is kept, and only for display: storage keys come from the sha256.
        display = name or PurePath((filename or "dataset.jsonl").replace("\\", "/")).name or "dataset.jsonl"
        _, report = await run_in_threadpool(read_dataset, path, source_name=display)
        if report.refused:
            raise HTTPException(422, {"message": report.message, "report": report.model_dump(mode="json")})
        key = f"datasets/sha256/{report.sha256}.jsonl"
        if not store.exists(key):
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
        await db.add_dataset(row)
        return to_view(row)
    finally:
        path.unlink(missing_ok=True)


@router.get("/{dataset_id}", response_model=DatasetView)
async def get_dataset(dataset_id: str, db: DbDep, principal: PrincipalDep) -> DatasetView:
    """A dataset's metadata and validation report (viewer of its project)."""
    row = await db.get_dataset(dataset_id)
    if row is None:
        raise HTTPException(404, f"dataset {dataset_id!r} not found")
    principal.require(row.project, Role.viewer, f"dataset {dataset_id!r}")
    return to_view(row)
