"""Who is calling: OIDC bearer tokens as Auth0 issues them, and roles per project.

With `LOCKN_TUNE_AUTH_ENABLED` off (the embedded stack) every request is one local user
with admin on every project. With it on, each request carries `Authorization: Bearer
<access token>`: an RS256 JWT from `LOCKN_TUNE_OIDC_ISSUER` for `LOCKN_TUNE_OIDC_AUDIENCE`,
signed by a key from the issuer's JWKS. Roles come from the claim named by
`LOCKN_TUNE_OIDC_ROLES_CLAIM`, either Auth0 RBAC permission strings
(`project:<project>:<role>`) or a namespaced dict claim ({project: role or [roles]}).

Routes take `PrincipalDep` and call `principal.require(project, Role.operator, "run r-1")`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from types import MappingProxyType
from typing import Annotated, Any

import httpx
import jwt
import structlog
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from schemas.settings import Settings

log = structlog.get_logger(__name__)

ALL_PROJECTS = "*"
REALM = "lockn-tune"
# RS256 only: accepting whatever the token header names is how HS256-with-the-public-key
# and "none" tokens get through (algorithm confusion).
ALGORITHM = "RS256"


class Role(IntEnum):
    """What a user may do in a project; each role includes the ones below it."""

    viewer = 1  # read runs and artifacts
    operator = 2  # create, pause, resume, cancel runs; upload datasets
    admin = 3  # manage projects, consents, publish targets


@dataclass(frozen=True)
class Principal:
    """The caller of one request and their highest role in each project."""

    subject: str  # token 'sub', or "local" when auth is off
    roles: Mapping[str, Role]  # project -> highest role; key "*" = every project
    auth_enabled: bool

    def role_in(self, project: str) -> Role | None:
        """The caller's highest role in `project`, counting a "*" grant; None if they have none."""
        granted = [r for r in (self.roles.get(project), self.roles.get(ALL_PROJECTS)) if r is not None]
        return max(granted) if granted else None

    def can(self, project: str, role: Role) -> bool:
        have = self.role_in(project)
        return have is not None and have >= role

    def require(self, project: str, role: Role, what: str) -> None:
        """Raise unless the caller has at least `role` in `project`.

        No role at all in the project is a 404 naming `what` (e.g. "run r-1"), so a token
        never learns which objects other projects hold; a lower role is a 403.
        """
        have = self.role_in(project)
        if have is None:
            raise HTTPException(404, f"{what} not found")
        if have < role:
            raise HTTPException(
                403,
                f"this needs the {role.name} role in project '{project}'; you are {have.name} there. "
                f"Ask an admin of '{project}' to grant {role.name}.",
            )

    def visible_projects(self) -> frozenset[str] | None:
        """Projects the caller may list things in; None means every project."""
        if ALL_PROJECTS in self.roles:
            return None
        return frozenset(self.roles)

    def require_any(self, role: Role) -> None:
        """Raise 403 unless the caller has at least `role` in some project."""
        if any(r >= role for r in self.roles.values()):
            return
        held = ", ".join(f"{p}: {r.name}" for p, r in sorted(self.roles.items())) or "no project roles"
        raise HTTPException(403, f"this needs the {role.name} role in at least one project; your token grants {held}")


LOCAL_PRINCIPAL = Principal("local", MappingProxyType({ALL_PROJECTS: Role.admin}), auth_enabled=False)


class AuthError(Exception):
    """The token is missing, malformed or not valid here; `reason` tells the user which (→ 401)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JwksUnavailable(Exception):
    """The issuer's signing keys could not be fetched, so no token can be checked (→ 503)."""


_PROJECT = r"\*|[A-Za-z0-9._-]+"
# "project:<project>:<role>" (Auth0 RBAC permissions) or "<project>:<role>".
_GRANT = re.compile(rf"^(?:project:)?(?P<project>{_PROJECT}):(?P<role>[A-Za-z]+)$")
_PROJECT_NAME = re.compile(rf"^(?:{_PROJECT})$")


def roles_from_claim(value: Any) -> dict[str, Role]:
    """Project roles from the roles claim, highest role per project.

    Accepts a list of "project:<project>:<role>" / "<project>:<role>" strings (other
    permission strings such as "read:runs" are ignored), one space-separated string of
    them (an OAuth `scope`), or a dict {project: role or [roles]}. Unknown role words and
    malformed project names are ignored rather than failing the whole token.
    """
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, list):
        for item in value:
            match = _GRANT.match(item) if isinstance(item, str) else None
            if match:
                pairs.append((match["project"], match["role"]))
    elif isinstance(value, dict):
        for project, granted in value.items():
            if isinstance(project, str) and _PROJECT_NAME.match(project):
                pairs.extend((project, r) for r in (granted if isinstance(granted, list) else [granted]))
    roles: dict[str, Role] = {}
    for project, word in pairs:
        role = Role.__members__.get(word.lower()) if isinstance(word, str) else None
        if role is not None and role > roles.get(project, 0):
            roles[project] = role
    return roles


def jwks_url(settings: Settings) -> str:
    """The JWKS address: the setting, else `<issuer>.well-known/jwks.json` (Auth0 issuers end in '/')."""
    if settings.oidc_jwks_url:
        return settings.oidc_jwks_url
    return f"{settings.oidc_issuer.rstrip('/')}/.well-known/jwks.json"


class SigningKeys:
    """The issuer's RS256 public keys by kid, fetched from its JWKS and cached.

    The cache is refreshed every `ttl_s`, so keys the issuer removes stop working. A kid
    not in the cache triggers a refetch (the issuer may just have rotated), but at most
    once per `unknown_kid_retry_s` per kid and `max_refetches_per_minute` in all, so a
    flood of made-up kids cannot hammer the issuer. If a refresh fails, the last keys keep
    working for up to `max_stale_s` rather than locking everyone out.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 600.0,
        max_stale_s: float = 3600.0,
        unknown_kid_retry_s: float = 30.0,
        max_refetches_per_minute: int = 10,
        timeout_s: float = 5.0,
    ):
        self.url = url
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.unknown_kid_retry_s = unknown_kid_retry_s
        self.max_refetches_per_minute = max_refetches_per_minute
        self.timeout_s = timeout_s
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._refresh_at = 0.0
        self._last_failure: tuple[float, JwksUnavailable] | None = None
        self._unknown_tried: dict[str, float] = {}
        self._refetches: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def get(self, kid: str | None) -> jwt.PyJWK:
        """The key named `kid`; raises AuthError if the issuer does not have it."""
        if time.monotonic() >= self._refresh_at:
            async with self._lock:
                if time.monotonic() >= self._refresh_at:
                    await self._refresh()
        key = self._lookup(kid)
        if key is None and kid is not None and self._may_refetch(kid):
            async with self._lock:
                key = self._lookup(kid)  # another request may have refetched meanwhile
                if key is None and self._may_refetch(kid):
                    now = time.monotonic()
                    self._unknown_tried[kid] = now
                    self._refetches.append(now)
                    await self._refresh(keep_stale=False)
                    key = self._lookup(kid)
        if key is not None:
            return key
        if kid is None:
            raise AuthError(
                f"token header has no kid and the issuer's JWKS at {self.url} holds {len(self._keys)} keys; "
                "send an access token issued by the configured issuer"
            )
        raise AuthError(
            f"signing key kid={kid} is not in the issuer's JWKS at {self.url}; the token was signed by another "
            "issuer or with a retired key, so sign in again"
        )

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    def _may_refetch(self, kid: str) -> bool:
        now = time.monotonic()
        tried = self._unknown_tried.get(kid)
        if tried is not None and now - tried < self.unknown_kid_retry_s:
            return False
        while self._refetches and now - self._refetches[0] >= 60.0:
            self._refetches.popleft()
        # Only kids that got a refetch are remembered, so this stays as small as the rate limit.
        self._unknown_tried = {k: t for k, t in self._unknown_tried.items() if now - t < self.unknown_kid_retry_s}
        return len(self._refetches) < self.max_refetches_per_minute

    async def _refresh(self, keep_stale: bool = True) -> None:
        """Fetch the JWKS; on failure keep recent keys if `keep_stale`, else raise JwksUnavailable."""
        now = time.monotonic()
        # A dead JWKS fails every queued request at once instead of one timeout after another.
        if self._last_failure and now - self._last_failure[0] < 2.0 and self._fetched_at is None:
            raise self._last_failure[1]
        try:
            self._keys = await self._fetch()
        except JwksUnavailable as exc:
            self._last_failure = (time.monotonic(), exc)
            fresh_enough = self._fetched_at is not None and now - self._fetched_at < self.ttl_s + self.max_stale_s
            if keep_stale and fresh_enough:
                log.warning("jwks_refresh_failed_using_cached_keys", url=self.url, error=str(exc))
                self._refresh_at = now + self.unknown_kid_retry_s
                return
            raise
        self._fetched_at = time.monotonic()
        self._refresh_at = self._fetched_at + self.ttl_s
        self._last_failure = None

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        hint = "check that the issuer is reachable from the API (LOCKN_TUNE_OIDC_ISSUER / LOCKN_TUNE_OIDC_JWKS_URL)"
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.get(self.url)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise JwksUnavailable(
                f"cannot fetch the issuer's signing keys from {self.url} ({exc or type(exc).__name__}); {hint}"
            ) from None
        keys: dict[str | None, jwt.PyJWK] = {}
        for jwk in body.get("keys", []) if isinstance(body, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
                continue
            if jwk.get("alg", ALGORITHM) != ALGORITHM:
                continue
            try:
                keys[jwk.get("kid")] = jwt.PyJWK(jwk, algorithm=ALGORITHM)
            except jwt.PyJWTError:
                continue  # one malformed key must not take the others down
        if not keys:
            raise JwksUnavailable(f"the issuer's JWKS at {self.url} holds no RS256 signing keys; {hint}")
        log.info("jwks_fetched", url=self.url, kids=sorted(k or "" for k in keys))
        return keys


def _utc(timestamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return repr(timestamp)


class TokenVerifier:
    """Checks bearer tokens against the configured OIDC issuer and maps them to a Principal.

    Extra keyword arguments tune the JWKS cache (see SigningKeys); the defaults suit Auth0.
    """

    def __init__(self, settings: Settings, **signing_keys: Any):
        missing = [name for name in ("oidc_issuer", "oidc_audience") if not getattr(settings, name)]
        if missing:
            names = " and ".join(f"LOCKN_TUNE_{n.upper()}" for n in missing)
            verb, it = ("are", "them") if len(missing) > 1 else ("is", "it")
            raise ValueError(f"auth is on (LOCKN_TUNE_AUTH_ENABLED) but {names} {verb} not set; set {it} or turn auth off")
        self.issuer: str = settings.oidc_issuer
        self.audience: str = settings.oidc_audience
        self.roles_claim = settings.oidc_roles_claim
        self.leeway_s = settings.oidc_leeway_s
        self.keys = SigningKeys(jwks_url(settings), **signing_keys)

    async def verify(self, token: str) -> Principal:
        """The Principal a valid token stands for; raises AuthError (→ 401) or JwksUnavailable (→ 503)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token ({exc}); send the access token as issued") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AuthError(f"token algorithm {alg!r} is not accepted; only {ALGORITHM} tokens from {self.issuer} are")
        kid = header.get("kid")
        key = await self.keys.get(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(self._explain(exc, token, kid)) from None
        # Exact match: PyJWT 2.10.0 compared a string issuer by substring.
        if claims["iss"] != self.issuer:
            raise AuthError(f"token issuer {claims['iss']!r} is not {self.issuer!r} (LOCKN_TUNE_OIDC_ISSUER)")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise AuthError("token 'sub' claim is empty; send a user's access token")
        return Principal(claims["sub"], MappingProxyType(roles_from_claim(claims.get(self.roles_claim))), True)

    def _explain(self, exc: jwt.PyJWTError, token: str, kid: Any) -> str:
        """A message that says what was wrong with the token and what to do about it."""
        if isinstance(exc, jwt.InvalidSignatureError):
            return f"token signature does not match signing key kid={kid} from {self.keys.url}; the token was altered"
        if isinstance(exc, jwt.DecodeError):
            return f"malformed token ({exc}); send the access token as issued"
        # Past this point the signature verified, so reading the claims is safe.
        claims = jwt.decode(token, options={"verify_signature": False})
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"token has no '{exc.claim}' claim; send an access token issued for this API"
        if isinstance(exc, jwt.ExpiredSignatureError):
            return f"token expired at {_utc(claims.get('exp'))}; sign in again"
        if isinstance(exc, jwt.ImmatureSignatureError):
            return f"token is not valid until {_utc(claims.get('nbf', claims.get('iat')))}; check this machine's clock"
        if isinstance(exc, jwt.InvalidAudienceError):
            aud = claims.get("aud")
            aud = aud if isinstance(aud, list) else [aud]
            return (
                f"token audience {aud} does not include {self.audience!r} (LOCKN_TUNE_OIDC_AUDIENCE); "
                "request the token for this API's audience"
            )
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"token issuer {claims.get('iss')!r} is not {self.issuer!r} (LOCKN_TUNE_OIDC_ISSUER)"
        return f"invalid token: {exc}"


def _challenge(description: str) -> dict[str, str]:
    # Header values must be latin-1 and the quoted-string must not break on '"' or '\'.
    safe = description.encode("ascii", "replace").decode().replace("\\", "/").replace('"', "'")
    return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{safe}"'}


# Parses `Authorization: Bearer <token>` and documents the scheme in OpenAPI (the Authorize
# button in /docs). auto_error=False: with auth off no header is needed, and with it on the
# 401s below say what was wrong instead of FastAPI's "Not authenticated".
bearer_scheme = HTTPBearer(
    bearerFormat="JWT",
    description="An RS256 access token from LOCKN_TUNE_OIDC_ISSUER for LOCKN_TUNE_OIDC_AUDIENCE. "
    "Not needed while LOCKN_TUNE_AUTH_ENABLED is off (the embedded stack).",
    auto_error=False,
)


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
) -> Principal:
    """The caller of this request: the local admin when auth is off, else from the bearer token."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return LOCAL_PRINCIPAL
    if credentials is None or " " in credentials.credentials:
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPException(
                401,
                "missing bearer token; send 'Authorization: Bearer <access token>' from your identity provider",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        scheme = header.strip().partition(" ")[0]
        reason = f"malformed Authorization header (scheme {scheme!r}); expected 'Bearer <access token>'"
        raise HTTPException(401, reason, headers=_challenge(reason))
    token = credentials.credentials
    verifier = getattr(request.app.state, "token_verifier", None)
    if verifier is None:
        try:
            verifier = request.app.state.token_verifier = TokenVerifier(settings)
        except ValueError as exc:
            raise HTTPException(500, str(exc)) from None
    try:
        return await verifier.verify(token)
    except AuthError as exc:
        raise HTTPException(401, exc.reason, headers=_challenge(exc.reason)) from None
    except JwksUnavailable as exc:
        raise HTTPException(503, f"cannot check tokens right now: {exc}") from None


PrincipalDep = Annotated[Principal, Depends(current_principal)]
