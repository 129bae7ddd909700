"""Bearer tokens and project roles (api/auth.py) against a real local issuer: RSA keys made
in the test, the JWKS served over loopback HTTP, a small FastAPI app called over ASGI.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/api/test_auth_tokens.py
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from api.auth import PrincipalDep, Role, TokenVerifier
from schemas.settings import Settings
from tests.auth_tokens import AUDIENCE, LocalIssuer, new_key

ROLES_URL = "https://lockn.dev/roles"


def client_for(settings: Settings, verifier: TokenVerifier | None = None) -> httpx.AsyncClient:
    """A small app whose routes guard themselves the way the real ones do."""
    app = FastAPI()
    app.state.settings = settings
    if verifier is not None:
        app.state.token_verifier = verifier

    @app.get("/whoami")
    async def whoami(principal: PrincipalDep):
        visible = principal.visible_projects()
        return {
            "subject": principal.subject,
            "roles": {project: role.name for project, role in principal.roles.items()},
            "visible": None if visible is None else sorted(visible),
            "auth_enabled": principal.auth_enabled,
        }

    @app.get("/v1/projects/{project}/runs/{run_id}")
    async def get_run(project: str, run_id: str, principal: PrincipalDep):
        principal.require(project, Role.viewer, f"run {run_id}")
        return {"id": run_id}

    @app.post("/v1/projects/{project}/runs")
    async def create_run(project: str, principal: PrincipalDep):
        principal.require(project, Role.operator, f"project {project}")
        return {"created": True}

    @app.get("/v1/runs")
    async def list_runs(principal: PrincipalDep):
        principal.require_any(Role.viewer)
        return {"projects": sorted(principal.visible_projects() or ["*"])}

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def issuer():
    with LocalIssuer() as issuer:
        yield issuer


@pytest.fixture
async def api(issuer, tmp_path):
    async with client_for(issuer.settings(tmp_path)) as client:
        yield client


async def whoami_error(api, token: str) -> tuple[int, str, str]:
    r = await api.get("/whoami", headers=bearer(token))
    return r.status_code, r.json()["detail"], r.headers.get("www-authenticate", "")


async def test_no_token_is_401_with_a_bearer_challenge(api):
    r = await api.get("/whoami")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="lockn-tune"'
    assert r.json()["detail"].startswith("missing bearer token; send 'Authorization: Bearer <access token>'")


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("Basic YWxpY2U6c2VjcmV0", "malformed Authorization header (scheme 'Basic'); expected 'Bearer <access token>'"),
        ("Bearer", "malformed Authorization header (scheme 'Bearer')"),
        ("Bearer two tokens", "malformed Authorization header"),
        ("Bearer not-a-jwt", "malformed token (Not enough segments)"),
    ],
)
async def test_malformed_authorization_is_401_saying_what_was_wrong(api, header, says):
    r = await api.get("/whoami", headers={"Authorization": header})
    assert r.status_code == 401
    assert says in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token", error_description="malformed')


async def test_expired_token_says_when_and_to_sign_in_again(api, issuer):
    status, detail, challenge = await whoami_error(api, issuer.token(expires_in=-3600))
    assert status == 401
    assert detail.startswith("token expired at 20") and detail.endswith("UTC; sign in again")
    assert "token expired at" in challenge
    # Inside the 30 s clock-skew leeway a just-expired token still works.
    assert (await api.get("/whoami", headers=bearer(issuer.token(expires_in=-10)))).status_code == 200


async def test_wrong_audience_names_both_and_the_setting(api, issuer):
    token = issuer.token(audience=["other-api", f"{issuer.issuer}userinfo"])
    status, detail, _ = await whoami_error(api, token)
    assert status == 401
    assert detail.startswith(
        f"token audience ['other-api', '{issuer.issuer}userinfo'] does not include 'lockn-tune-api' "
        "(LOCKN_TUNE_OIDC_AUDIENCE)"
    )


@pytest.mark.parametrize("bad_issuer", ["https://evil.example/", "http://127.0.0.1"])
async def test_wrong_issuer_is_rejected_exactly(api, issuer, bad_issuer):
    status, detail, _ = await whoami_error(api, issuer.token(issuer=bad_issuer))
    assert status == 401
    assert detail == f"token issuer '{bad_issuer}' is not '{issuer.issuer}' (LOCKN_TUNE_OIDC_ISSUER)"


async def test_unknown_kid_refetches_once_then_names_the_jwks(api, issuer):
    status, detail, _ = await whoami_error(api, issuer.token(kid="retired-key"))
    assert status == 401
    assert detail.startswith(f"signing key kid=retired-key is not in the issuer's JWKS at {issuer.jwks_url}")
    assert issuer.fetches == 2  # the first load, then one refetch in case the issuer had rotated
    for _ in range(5):
        assert (await whoami_error(api, issuer.token(kid="retired-key")))[0] == 401
    assert issuer.fetches == 2  # the same unknown kid does not refetch again within 30 s


@pytest.mark.parametrize("alg", ["HS256", "none"])
async def test_algorithm_confusion_is_rejected(api, issuer, alg):
    # HS256 is signed with the issuer's public key PEM as the HMAC secret: the classic attack.
    status, detail, _ = await whoami_error(api, issuer.token(alg=alg, roles=["project:demo:admin"]))
    assert status == 401
    assert detail == f"token algorithm '{alg}' is not accepted; only RS256 tokens from {issuer.issuer} are"


async def test_token_signed_by_another_key_under_a_known_kid_is_rejected(api, issuer):
    status, detail, _ = await whoami_error(api, issuer.token(key=new_key()))
    assert status == 401
    assert detail.startswith(f"token signature does not match signing key kid={issuer.current_kid}")


@pytest.mark.parametrize(("claim", "kwargs"), [("sub", {"sub": None}), ("exp", {"expires_in": None})])
async def test_missing_required_claim_is_named(api, issuer, claim, kwargs):
    status, detail, _ = await whoami_error(api, issuer.token(**kwargs))
    assert status == 401
    assert detail.startswith(f"token has no '{claim}' claim")


async def test_auth0_permissions_become_project_roles(api, issuer):
    permissions = [
        "project:demo:viewer",
        "project:demo:operator",  # highest role wins
        "research:admin",  # the short form
        "read:runs",  # an unrelated API permission
        "project:demo:owner",  # not a role
        "project:bad name:admin",  # not a project name
    ]
    # Auth0 gives a list audience when openid scopes were requested too.
    token = issuer.token(sub="auth0|alice", roles=permissions, audience=[AUDIENCE, f"{issuer.issuer}userinfo"])
    r = await api.get("/whoami", headers=bearer(token))
    assert r.status_code == 200
    assert r.json() == {
        "subject": "auth0|alice",
        "roles": {"demo": "operator", "research": "admin"},
        "visible": ["demo", "research"],
        "auth_enabled": True,
    }
    assert (await api.post("/v1/projects/demo/runs", headers=bearer(token))).json() == {"created": True}


async def test_namespaced_dict_claim_becomes_project_roles(issuer, tmp_path):
    roles = {"demo": "viewer", "voices": ["viewer", "admin"], "*": "viewer", "bad name": "admin", "x": "superuser"}
    token = issuer.token(roles=roles, claim=ROLES_URL, permissions=["project:other:admin"])
    async with client_for(issuer.settings(tmp_path, oidc_roles_claim=ROLES_URL)) as api:
        r = await api.get("/whoami", headers=bearer(token))
        assert r.status_code == 200
        # Only the configured claim counts; "*" makes every project visible.
        assert r.json()["roles"] == {"demo": "viewer", "voices": "admin", "*": "viewer"}
        assert r.json()["visible"] is None
        assert (await api.get("/v1/projects/anything/runs/r-1", headers=bearer(token))).status_code == 200
        r = await api.post("/v1/projects/other/runs", headers=bearer(token))
        assert r.status_code == 403


async def test_viewer_creating_a_run_gets_403_naming_role_and_project(api, issuer):
    token = issuer.token(roles=["project:demo:viewer"])
    r = await api.post("/v1/projects/demo/runs", headers=bearer(token))
    assert r.status_code == 403
    assert r.json()["detail"] == (
        "this needs the operator role in project 'demo'; you are viewer there. "
        "Ask an admin of 'demo' to grant operator."
    )
    assert (await api.get("/v1/projects/demo/runs/r-1", headers=bearer(token))).status_code == 200


async def test_no_role_in_project_looks_like_not_found(api, issuer):
    token = issuer.token(roles=["project:demo:admin"])
    r = await api.get("/v1/projects/secret/runs/r-1", headers=bearer(token))
    assert r.status_code == 404 and r.json()["detail"] == "run r-1 not found"
    r = await api.post("/v1/projects/secret/runs", headers=bearer(token))
    assert r.status_code == 404 and r.json()["detail"] == "project secret not found"


async def test_token_without_roles_cannot_list_anything(api, issuer):
    r = await api.get("/v1/runs", headers=bearer(issuer.token()))
    assert r.status_code == 403
    assert r.json()["detail"] == (
        "this needs the viewer role in at least one project; your token grants no project roles"
    )
    r = await api.get("/v1/runs", headers=bearer(issuer.token(roles=["project:demo:viewer"])))
    assert r.json() == {"projects": ["demo"]}


async def test_rotated_key_is_accepted_after_one_refetch(api, issuer):
    old = issuer.token()
    assert (await api.get("/whoami", headers=bearer(old))).status_code == 200
    assert issuer.fetches == 1
    issuer.rotate()
    assert (await api.get("/whoami", headers=bearer(issuer.token()))).status_code == 200
    assert issuer.fetches == 2
    assert (await api.get("/whoami", headers=bearer(old))).status_code == 200  # old key still published
    assert issuer.fetches == 2


async def test_removed_key_stops_working_after_the_cache_refresh(issuer, tmp_path):
    settings = issuer.settings(tmp_path)
    old_kid = issuer.current_kid
    issuer.rotate()  # before the clock starts: making a key can take a while
    old = issuer.token(kid=old_kid)
    async with client_for(settings, TokenVerifier(settings, ttl_s=0.5)) as api:
        assert (await api.get("/whoami", headers=bearer(old))).status_code == 200
        issuer.retire(old_kid)
        assert (await api.get("/whoami", headers=bearer(old))).status_code == 200  # still cached
        await asyncio.sleep(0.6)
        status, detail, _ = await whoami_error(api, old)
        assert status == 401 and detail.startswith(f"signing key kid={old_kid} is not in the issuer's JWKS")
        assert (await api.get("/whoami", headers=bearer(issuer.token()))).status_code == 200


async def test_flood_of_unknown_kids_fetches_the_jwks_a_bounded_number_of_times(api, issuer):
    good = issuer.token()
    assert (await api.get("/whoami", headers=bearer(good))).status_code == 200
    tokens = [issuer.token(kid=f"made-up-{i}") for i in range(50)]
    responses = await asyncio.gather(*(api.get("/whoami", headers=bearer(t)) for t in tokens))
    assert {r.status_code for r in responses} == {401}
    assert issuer.fetches == 1 + 10  # the first load, then at most 10 refetches a minute
    # Past the limit a rotated key waits for the next refresh, but existing keys are unaffected.
    assert (await api.get("/whoami", headers=bearer(good))).status_code == 200


async def test_concurrent_first_requests_share_one_jwks_fetch(api, issuer):
    token = issuer.token(roles=["project:demo:viewer"])
    responses = await asyncio.gather(*(api.get("/whoami", headers=bearer(token)) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert issuer.fetches == 1


async def test_unreachable_jwks_is_503_not_401(api, issuer):
    token = issuer.token()
    issuer.stop()
    r = await api.get("/whoami", headers=bearer(token))
    assert r.status_code == 503
    assert r.json()["detail"].startswith(
        f"cannot check tokens right now: cannot fetch the issuer's signing keys from {issuer.jwks_url}"
    )
    assert "LOCKN_TUNE_OIDC_JWKS_URL" in r.json()["detail"]


async def test_cached_keys_outlive_a_jwks_outage(issuer, tmp_path):
    settings = issuer.settings(tmp_path)
    async with client_for(settings, TokenVerifier(settings, ttl_s=0.2)) as api:
        token = issuer.token()
        assert (await api.get("/whoami", headers=bearer(token))).status_code == 200
        issuer.stop()
        await asyncio.sleep(0.3)
        assert (await api.get("/whoami", headers=bearer(token))).status_code == 200


async def test_jwks_url_setting_overrides_the_issuer_default(issuer, tmp_path):
    settings = issuer.settings(tmp_path, oidc_jwks_url=f"http://127.0.0.1:{issuer.port}/keys.json")
    async with client_for(settings) as api:
        r = await api.get("/whoami", headers=bearer(issuer.token()))
        assert r.status_code == 503 and f"http://127.0.0.1:{issuer.port}/keys.json (Client error '404" in r.text


async def test_auth_on_without_audience_says_which_setting_is_missing(issuer, tmp_path):
    async with client_for(issuer.settings(tmp_path, oidc_audience=None)) as api:
        r = await api.get("/whoami", headers=bearer(issuer.token()))
        assert r.status_code == 500
        assert r.json()["detail"].startswith(
            "auth is on (LOCKN_TUNE_AUTH_ENABLED) but LOCKN_TUNE_OIDC_AUDIENCE is not set"
        )


async def test_auth_off_is_one_local_admin(tmp_path):
    async with client_for(Settings(home=tmp_path, auth_enabled=False)) as api:
        r = await api.get("/whoami")
        assert r.json() == {"subject": "local", "roles": {"*": "admin"}, "visible": None, "auth_enabled": False}
        assert (await api.post("/v1/projects/anything/runs")).json() == {"created": True}
        # A stray token is ignored rather than checked.
        assert (await api.get("/whoami", headers=bearer("not-a-jwt"))).status_code == 200
