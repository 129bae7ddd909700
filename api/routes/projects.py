"""Projects and what their admins manage: consents for voice cloning and publish targets.

Roles come from the caller's token (see api/auth.py): anyone with a role in a project can
read it; admins change it. A project the caller has no role in does not exist for them.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Path

from api.deps import DbDep, PrincipalDep, Role
from schemas.api import (
    ConsentCreate,
    ConsentList,
    ConsentView,
    ProjectCreate,
    ProjectList,
    ProjectUpdate,
    ProjectView,
    PublishTargetCreate,
    PublishTargetList,
    PublishTargetView,
    WhoAmI,
)
from schemas.run_spec import SLUG
from store.tables import ConsentRow, ProjectRow, PublishTargetRow, new_id

router = APIRouter(prefix="/v1", tags=["projects"])
ProjectId = Path(pattern=SLUG, description="Project slug.")


def project_view(row: ProjectRow, principal) -> ProjectView:
    role = principal.role_in(row.id)
    return ProjectView(**row.model_dump(), your_role=role.name if role else None)


def consent_view(row: ConsentRow) -> ConsentView:
    return ConsentView(**row.model_dump(), active=row.revoked_at is None)


@router.get("/me", response_model=WhoAmI, tags=["auth"])
async def whoami(principal: PrincipalDep) -> WhoAmI:
    """Who the API thinks the caller is, and their role in each project."""
    return WhoAmI(
        subject=principal.subject,
        auth_enabled=principal.auth_enabled,
        roles={p: r.name for p, r in sorted(principal.roles.items())},
    )


@router.get("/projects", response_model=ProjectList)
async def list_projects(db: DbDep, principal: PrincipalDep) -> ProjectList:
    """The projects the caller has a role in."""
    rows = await db.list_projects(principal.visible_projects())
    return ProjectList(projects=[project_view(r, principal) for r in rows])


@router.post("/projects", status_code=201, response_model=ProjectView)
async def create_project(body: ProjectCreate, db: DbDep, principal: PrincipalDep) -> ProjectView:
    """Create a project (admin of that project name, or of every project)."""
    principal.require(body.id, Role.admin, f"project {body.id!r}")
    row = ProjectRow(
        id=body.id, display_name=body.display_name or body.id, description=body.description, created_by=principal.subject
    )
    if not await db.create_project(row):
        raise HTTPException(409, f"project {body.id!r} already exists")
    return project_view(row, principal)


@router.get("/projects/{project}", response_model=ProjectView)
async def get_project(db: DbDep, principal: PrincipalDep, project: str = ProjectId) -> ProjectView:
    principal.require(project, Role.viewer, f"project {project!r}")
    row = await db.get_project(project)
    if row is None:
        raise HTTPException(404, f"project {project!r} not found")
    return project_view(row, principal)


@router.patch("/projects/{project}", response_model=ProjectView)
async def update_project(body: ProjectUpdate, db: DbDep, principal: PrincipalDep, project: str = ProjectId) -> ProjectView:
    """Rename or describe a project (admin)."""
    principal.require(project, Role.admin, f"project {project!r}")
    row = await db.update_project(project, **body.model_dump(exclude_none=True))
    if row is None:
        raise HTTPException(404, f"project {project!r} not found")
    return project_view(row, principal)


@router.get("/projects/{project}/consents", response_model=ConsentList)
async def list_consents(db: DbDep, principal: PrincipalDep, project: str = ProjectId) -> ConsentList:
    """Recorded voice-cloning consents, revoked ones included (viewer)."""
    principal.require(project, Role.viewer, f"project {project!r}")
    return ConsentList(consents=[consent_view(r) for r in await db.consents(project)])


@router.post("/projects/{project}/consents", status_code=201, response_model=ConsentView)
async def record_consent(body: ConsentCreate, db: DbDep, principal: PrincipalDep, project: str = ProjectId) -> ConsentView:
    """Record a speaker's consent to have their voice cloned in this project (admin)."""
    principal.require(project, Role.admin, f"project {project!r}")
    row = ConsentRow(id=new_id("consent"), project=project, recorded_by=principal.subject, **body.model_dump())
    return consent_view(await db.add_consent(row))


@router.post("/projects/{project}/consents/{consent_id}/revoke", response_model=ConsentView)
async def revoke_consent(db: DbDep, principal: PrincipalDep, consent_id: str, project: str = ProjectId) -> ConsentView:
    """Revoke a consent (admin): no new voice may be trained on it. Revoking twice keeps the first."""
    principal.require(project, Role.admin, f"project {project!r}")
    row = await db.get_consent(consent_id)
    if row is None or row.project != project:
        raise HTTPException(404, f"consent {consent_id!r} not found in project {project!r}")
    return consent_view(await db.revoke_consent(consent_id, principal.subject))


@router.get("/projects/{project}/publish-targets", response_model=PublishTargetList)
async def list_publish_targets(db: DbDep, principal: PrincipalDep, project: str = ProjectId) -> PublishTargetList:
    principal.require(project, Role.viewer, f"project {project!r}")
    return PublishTargetList(targets=[PublishTargetView(**r.model_dump()) for r in await db.publish_targets(project)])


@router.post("/projects/{project}/publish-targets", status_code=201, response_model=PublishTargetView)
async def add_publish_target(
    body: PublishTargetCreate, db: DbDep, principal: PrincipalDep, project: str = ProjectId
) -> PublishTargetView:
    """Add a place the project's adapters may be published to (admin)."""
    principal.require(project, Role.admin, f"project {project!r}")
    row = PublishTargetRow(
        id=new_id("target"), project=project, name=body.name, kind=body.kind.value, config=body.config,
        created_by=principal.subject,
    )
    if not await db.add_publish_target(row):
        raise HTTPException(409, f"project {project!r} already has a publish target named {body.name!r}")
    return PublishTargetView(**row.model_dump())


@router.delete("/projects/{project}/publish-targets/{target_id}", status_code=204)
async def delete_publish_target(db: DbDep, principal: PrincipalDep, target_id: str, project: str = ProjectId) -> None:
    """Remove a publish target (admin). Adapters already published there stay."""
    principal.require(project, Role.admin, f"project {project!r}")
    row = await db.get_publish_target(target_id)
    if row is None or row.project != project:
        raise HTTPException(404, f"publish target {target_id!r} not found in project {project!r}")
    await db.delete_publish_target(target_id)
