"""Per-project roles on every route, with real OIDC-style tokens (RS256, served JWKS).

Two projects, `alpha` and `beta`. Everything of beta is made by beta's admin; then each
route in the OpenAPI schema is called with no token, with alpha's operator (no role in
beta), with the role just below the one the route needs, and with the role it needs.
A route added without an entry in ROUTES fails `test_every_route_is_in_the_table`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import pytest
import pytest_asyncio

from api.app import create_app
from store.blocking import BlockingDatabase
from store.tables import ArtifactRow
from tests.auth_tokens import LocalIssuer
from tests.conftest import small_spec

PUBLIC, SIGNED_IN, VIEWER, OPERATOR, ADMIN = "public", "signed-in", "viewer", "operator", "admin"
BELOW = {VIEWER: None, OPERATOR: VIEWER, ADMIN: OPERATOR}

# (method, path) -> the least a caller needs on the object's project.
ROUTES: dict[tuple[str, str], str] = {
    ("get", "/healthz"): PUBLIC,
    ("get", "/v1/me"): SIGNED_IN,
    ("get", "/v1/models"): SIGNED_IN,
    ("get", "/v1/models/{model_id}"): SIGNED_IN,
    ("get", "/v1/runs"): SIGNED_IN,
    ("get", "/v1/projects"): SIGNED_IN,
    ("post", "/v1/runs"): OPERATOR,
    ("get", "/v1/runs/{run_id}"): VIEWER,
    ("post", "/v1/runs/{run_id}/cancel"): OPERATOR,
    ("post", "/v1/runs/{run_id}/pause"): OPERATOR,
    ("post", "/v1/runs/{run_id}/resume"): OPERATOR,
    ("get", "/v1/runs/{run_id}/preflight"): VIEWER,
    ("get", "/v1/runs/{run_id}/artifacts"): VIEWER,
    ("get", "/v1/runs/{run_id}/events"): VIEWER,
    ("post", "/v1/runs/{run_id}/publish-checkpoint"): OPERATOR,
    ("post", "/v1/datasets"): OPERATOR,
    ("get", "/v1/datasets"): SIGNED_IN,
    ("get", "/v1/datasets/{dataset_id}"): VIEWER,
    ("delete", "/v1/datasets/{dataset_id}"): OPERATOR,
    ("get", "/v1/artifacts/{artifact_id}"): VIEWER,
    ("post", "/v1/preflight"): OPERATOR,
    ("post", "/v1/projects"): ADMIN,
    ("get", "/v1/projects/{project}"): VIEWER,
    ("patch", "/v1/projects/{project}"): ADMIN,
    ("get", "/v1/projects/{project}/consents"): VIEWER,
    ("post", "/v1/projects/{project}/consents"): ADMIN,
    ("post", "/v1/projects/{project}/consents/{consent_id}/revoke"): ADMIN,
    ("get", "/v1/projects/{project}/publish-targets"): VIEWER,
    ("post", "/v1/projects/{project}/publish-targets"): ADMIN,
    ("delete", "/v1/projects/{project}/publish-targets/{target_id}"): ADMIN,
}


@dataclass
class World:
    api: httpx.AsyncClient
    issuer: LocalIssuer
    ids: dict[str, str] = field(default_factory=dict)
    spec: dict = field(default_factory=dict)

    def token(self, roles: dict[str, str] | None, sub: str = "user") -> dict[str, str]:
        perms = [f"project:{p}:{r}" for p, r in (roles or {}).items()]
        return {"Authorization": f"Bearer {self.issuer.token(sub=sub, roles=perms)}"}


@pytest.fixture(scope="module")
def issuer():
    with LocalIssuer() as iss:
        yield iss


@pytest_asyncio.fixture
async def world(stack, temporal_env, issuer, tiny_model, datasets):
    settings = issuer.settings(
        stack.settings.home,
        cpu_task_queue=stack.settings.cpu_task_queue,
        gpu_task_queue=stack.settings.gpu_task_queue,
        heartbeat_every_s=stack.settings.heartbeat_every_s,
        temporal_address=temporal_env.client.service_client.config.target_host,
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as api:
        w = World(api, issuer)
        admin = w.token({"beta": ADMIN}, sub="beta-admin")
        ds = await api.post("/v1/datasets", params={"project": "beta"}, headers=admin,
                            files={"file": ("i.jsonl", datasets["instruction"].read_bytes())})
        assert ds.status_code == 201, ds.text
        w.ids["dataset_id"] = ds.json()["id"]
        spare = await api.post("/v1/datasets", params={"project": "beta"}, headers=admin,
                               files={"file": ("chat.jsonl", datasets["chat"].read_bytes())})
        assert spare.status_code == 201, spare.text
        w.ids["spare_dataset_id"] = spare.json()["id"]  # no run uses it: DELETE may take it
        w.spec = small_spec(tiny_model, w.ids["dataset_id"], project="beta",
                            hyperparameters={"max_steps": 2000}, checkpoint_every_steps=1000).model_dump(mode="json")
        run = await api.post("/v1/runs", json=w.spec, headers=admin)
        assert run.status_code == 201, run.text
        w.ids["run_id"] = run.json()["id"]
        for _ in range(600):  # past preflight, so the run has a report to read
            state = (await api.get(f"/v1/runs/{w.ids['run_id']}", headers=admin)).json()["state"]
            if state not in ("queued", "preflight"):
                break
            await asyncio.sleep(0.1)
        await api.post(f"/v1/runs/{w.ids['run_id']}/cancel", headers=admin)
        consent = await api.post("/v1/projects/beta/consents", headers=admin,
                                 json={"speaker": "Bea", "statement": "Bea agrees to a voice model for beta's demos."})
        assert consent.status_code == 201, consent.text
        w.ids["consent_id"] = consent.json()["id"]
        target = await api.post("/v1/projects/beta/publish-targets", headers=admin,
                                json={"name": "ollama", "kind": "ollama", "config": {"endpoint": "http://ollama:11434"}})
        assert target.status_code == 201, target.text
        w.ids["target_id"] = target.json()["id"]
        db = BlockingDatabase(settings.db_url)
        try:
            db.add_artifact(ArtifactRow(id="art_beta", run_id=w.ids["run_id"], kind="adapter", uri="s3://x/y",
                                        sha256="0" * 64, size_bytes=1, manifest={"run_id": w.ids["run_id"]}))
        finally:
            db.close()
        w.ids["artifact_id"] = "art_beta"
        w.ids["project"] = "beta"
        w.ids["model_id"] = "Qwen/Qwen2.5-0.5B-Instruct"
        yield w
        # Stop whatever the test started, so no training outlives it.
        for run in (await api.get("/v1/runs", headers=admin)).json()["runs"]:
            if run["state"] not in ("succeeded", "failed", "cancelled"):
                await api.post(f"/v1/runs/{run['id']}/cancel", headers=admin)


def request_for(w: World, method: str, path: str, datasets) -> dict:
    """A well-formed request for the route, aimed at project beta's objects."""
    url = path.format(**w.ids)
    kw: dict = {"method": method.upper(), "url": url}
    if (method, path) == ("post", "/v1/runs"):
        kw["json"] = w.spec
    elif (method, path) == ("post", "/v1/preflight"):
        kw["json"] = {**w.spec, "hyperparameters": {"max_steps": 4}}
    elif (method, path) == ("post", "/v1/datasets"):
        kw["params"] = {"project": "beta"}
        kw["files"] = {"file": ("c.jsonl", datasets["completion"].read_bytes())}
    elif (method, path) == ("post", "/v1/projects"):
        kw["json"] = {"id": "beta", "description": "again"}
    elif (method, path) == ("patch", "/v1/projects/{project}"):
        kw["json"] = {"description": "the beta team"}
    elif (method, path) == ("post", "/v1/projects/{project}/consents"):
        kw["json"] = {"speaker": "Ben", "statement": "Ben agrees to a voice model for beta's demos."}
    elif (method, path) == ("post", "/v1/projects/{project}/publish-targets"):
        kw["json"] = {"name": f"dir-{method}", "kind": "directory", "config": {"path": "/srv/models"}}
    elif path == "/v1/runs/{run_id}/events":
        kw["params"] = {"follow": "false"}
    elif (method, path) == ("delete", "/v1/datasets/{dataset_id}"):
        kw["url"] = f"/v1/datasets/{w.ids['spare_dataset_id']}"
    elif path == "/v1/runs/{run_id}/publish-checkpoint":
        kw["params"] = {"wait_s": 0}
    return kw


async def test_every_route_is_in_the_table(world):
    schema = (await world.api.get("/openapi.json")).json()
    served = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert served == set(ROUTES), f"routes without a role in ROUTES: {served - set(ROUTES)}; stale: {set(ROUTES) - served}"


def test_openapi_documents_the_bearer_scheme(issuer, tmp_path):
    # What /docs shows: an Authorize button for a JWT bearer token, and a lock on every route but the public ones.
    schema = create_app(issuer.settings(tmp_path)).openapi()
    [(name, scheme)] = schema["components"]["securitySchemes"].items()
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert "LOCKN_TUNE_OIDC_ISSUER" in scheme["description"]
    for (method, path), need in ROUTES.items():
        security = schema["paths"][path][method].get("security")
        assert security == (None if need == PUBLIC else [{name: []}]), (method, path, security)


async def test_no_token_is_401_on_every_protected_route(world, datasets):
    for (method, path), need in ROUTES.items():
        r = await world.api.request(**request_for(world, method, path, datasets))
        if need == PUBLIC:
            assert r.status_code != 401, path
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer"), path


async def test_roles_on_every_route(world, datasets):
    outsider = world.token({"alpha": OPERATOR}, sub="alpha-op")
    for (method, path), need in ROUTES.items():
        if need in (PUBLIC, SIGNED_IN):
            r = await world.api.request(**request_for(world, method, path, datasets), headers=outsider)
            assert r.status_code not in (401, 403, 404), (method, path, r.status_code, r.text)
            continue
        # No role in beta: beta's objects do not exist for this caller.
        r = await world.api.request(**request_for(world, method, path, datasets), headers=outsider)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        # A role in beta, but too low: refused, and told which role is needed.
        if BELOW[need]:
            r = await world.api.request(**request_for(world, method, path, datasets),
                                        headers=world.token({"beta": BELOW[need]}))
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert need in r.json()["detail"], r.text
        # The role the route needs: past authorization (it may still answer 409 or 422 on the object's state).
        r = await world.api.request(**request_for(world, method, path, datasets), headers=world.token({"beta": need}))
        assert r.status_code not in (401, 403, 404), (method, path, r.status_code, r.text)


async def test_viewer_cannot_create_a_run(world):
    r = await world.api.post("/v1/runs", json=world.spec, headers=world.token({"beta": VIEWER}))
    assert r.status_code == 403 and "operator" in r.json()["detail"]


async def test_other_projects_runs_are_invisible(world, tiny_model, datasets):
    alpha_op = world.token({"alpha": OPERATOR}, sub="alpha-op")
    run_id = world.ids["run_id"]
    assert (await world.api.get(f"/v1/runs/{run_id}", headers=alpha_op)).status_code == 404
    # Exactly the answer for a run that does not exist: nothing to tell them apart.
    missing = await world.api.get("/v1/runs/run_0000000000000000", headers=alpha_op)
    theirs = await world.api.get(f"/v1/runs/{run_id}", headers=alpha_op)
    assert missing.json()["detail"].replace("run_0000000000000000", "X") == theirs.json()["detail"].replace(run_id, "X")
    assert (await world.api.get("/v1/runs", headers=alpha_op)).json()["runs"] == []
    assert (await world.api.get("/v1/runs", params={"project": "beta"}, headers=alpha_op)).json()["runs"] == []
    assert (await world.api.get("/v1/datasets", headers=alpha_op)).json()["datasets"] == []
    assert (await world.api.get("/v1/datasets", params={"project": "beta"}, headers=alpha_op)).json()["datasets"] == []
    assert [p["id"] for p in (await world.api.get("/v1/projects", headers=alpha_op)).json()["projects"]] == []
    # Beta's dataset cannot be smuggled into an alpha run.
    spec = {**world.spec, "project": "alpha"}
    r = await world.api.post("/v1/runs", json=spec, headers=alpha_op)
    assert r.status_code == 422 and "not found in project 'alpha'" in r.json()["detail"]
    # With auth on, a dataset must be an upload, never a path on the server.
    r = await world.api.post("/v1/runs", json={**spec, "dataset": "/etc/passwd"}, headers=alpha_op)
    assert r.status_code == 422 and "uploaded dataset" in r.json()["detail"]
    # Beta's viewer sees the run and its project.
    beta_viewer = world.token({"beta": VIEWER})
    assert (await world.api.get(f"/v1/runs/{run_id}", headers=beta_viewer)).json()["project"] == "beta"
    assert {d["id"] for d in (await world.api.get("/v1/datasets", headers=beta_viewer)).json()["datasets"]} == {
        world.ids["dataset_id"], world.ids["spare_dataset_id"]}
    assert [r["id"] for r in (await world.api.get("/v1/runs", headers=beta_viewer)).json()["runs"]] == [run_id]
    me = (await world.api.get("/v1/me", headers=beta_viewer)).json()
    assert me == {"subject": "user", "auth_enabled": True, "roles": {"beta": "viewer"}}


async def test_idempotent_submission_makes_one_run(world):
    op = world.token({"beta": OPERATOR}, sub="beta-op")
    headers = {**op, "Idempotency-Key": "submit-1"}
    first, again = await asyncio.gather(
        world.api.post("/v1/runs", json=world.spec, headers=headers),
        world.api.post("/v1/runs", json=world.spec, headers=headers),
    )
    assert sorted([first.status_code, again.status_code]) == [200, 201], (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    other = await world.api.post("/v1/runs", json={**world.spec, "name": "different"}, headers=headers)
    assert other.status_code == 409 and "different spec" in other.json()["detail"]
    await world.api.post(f"/v1/runs/{first.json()['id']}/cancel", headers=op)


def test_api_refuses_to_start_with_auth_half_configured(tmp_path):
    from schemas.settings import Settings

    with pytest.raises(ValueError, match="LOCKN_TUNE_OIDC_AUDIENCE is not set"):
        create_app(Settings(home=tmp_path, auth_enabled=True, oidc_issuer="https://tenant.auth0.com/"))
